"""The suite's warm launches (helpers.WarmLaunches running tests/launch_pool.py): a job run in a launch that
has run another job before it equals the same job in a launch of its own, bit for bit, on DDP and on
ZeRO-3 (whose partitioned parameters and DeepSpeed's communication state live in the processes)."""

from __future__ import annotations

import pytest
from helpers import REPO, TWO_PROCESSES, WARM_LAUNCHES, assert_same_run, job_args, launch
from launch_pool import launch_key


def test_a_variable_the_test_process_sets_for_itself_keeps_the_launch_and_any_other_starts_one():
    env = {"HF_HUB_OFFLINE": "1", "PYTEST_CURRENT_TEST": "a (call)"}
    key = launch_key(TWO_PROCESSES, env)
    assert key == (TWO_PROCESSES, (("HF_HUB_OFFLINE", "1"),))
    same = {**env, "PYTEST_CURRENT_TEST": "b (call)", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR": "140272"}
    assert launch_key(TWO_PROCESSES, same) == key
    assert launch_key(TWO_PROCESSES, {**env, "OMP_NUM_THREADS": "1"}) != key
    assert launch_key(TWO_PROCESSES, {**env, "HF_HUB_OFFLINE": "0"}) != key
    assert launch_key("accelerate_configs/ds_zero3.yaml", env) != key


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", [TWO_PROCESSES, "accelerate_configs/ds_zero3.yaml"])
def test_a_job_in_a_warm_launch_after_another_equals_a_launch_of_its_own(
    tiny_llama, tmp_path, accelerate_config
):
    launch(accelerate_config, "sft", job_args(tiny_llama, tmp_path / "before", "--seed", "3"))
    launch(accelerate_config, "sft", job_args(tiny_llama, tmp_path / "warm"))
    key, (launcher, _, jobs, _) = list(WARM_LAUNCHES.launches.items())[-1]  # the most recently used
    assert key[0] == str(REPO / accelerate_config)
    assert jobs >= 2 and launcher.poll() is None  # the second job ran in the processes of the first
    launch(accelerate_config, "sft", job_args(tiny_llama, tmp_path / "alone"), warm=False)
    assert_same_run(tmp_path / "warm", tmp_path / "alone")
