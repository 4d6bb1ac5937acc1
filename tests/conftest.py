import pytest
from helpers import make_tiny_decoder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama with the test chat tokenizer, shared by the whole session (read-only)."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny_llama"), "llama")
