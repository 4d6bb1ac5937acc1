"""The bundled text-classification dataset: short news items labelled with one of four topics.

`python -m recipes.data.generators.news_topics` rewrites recipes/data/news_topics/ byte for byte; a test
checks that the committed files are exactly what this module produces. Sentences are built from many
templates and fillers, place names and numbers are shared by all topics, and no text appears in two
splits; validation and test sentences come from templates that training never sees, so a classifier
has to pick up what a topic is about rather than memorise sentence patterns.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent
NEWS_DIR = DATA_DIR / "news_topics"
LABELS = ["business", "science", "sports", "travel"]
# Uneven classes, so that the majority-class baseline is a real bar to clear.
LABEL_WEIGHTS = {"sports": 0.34, "business": 0.26, "science": 0.22, "travel": 0.18}
SPLIT_SIZES = {"train": 800, "validation": 200, "test": 200}
HELD_OUT = 4  # templates per topic seen only in validation and test

_FILL = {
    "city": [
        "Lisbon",
        "Osaka",
        "Denver",
        "Nairobi",
        "Krakow",
        "Melbourne",
        "Toronto",
        "Seville",
        "Bergen",
        "Lyon",
        "Cairo",
        "Quito",
        "Hanoi",
        "Glasgow",
        "Porto",
        "Tbilisi",
        "Halifax",
        "Busan",
    ],
    "country": [
        "Chile",
        "Norway",
        "Kenya",
        "Japan",
        "Canada",
        "Poland",
        "Brazil",
        "Vietnam",
        "Ireland",
        "Morocco",
    ],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "month": ["March", "April", "May", "June", "September", "October", "November"],
    "team": [
        "the Harbour City Rovers",
        "Northfield United",
        "the Valley Hawks",
        "Eastport Athletic",
        "the Red Lions",
        "Westbrook Rangers",
        "the Coastal Sharks",
        "Millbridge Town",
    ],
    "player": [
        "Ana Ruiz",
        "Tom Becker",
        "Kofi Mensah",
        "Yuki Sato",
        "Lena Novak",
        "Sam Carter",
        "Ravi Patel",
    ],
    "competition": ["league", "cup", "championship", "regional trophy", "national series"],
    "sport_event": ["match", "game", "derby", "final", "qualifier"],
    "company": [
        "Northwind Foods",
        "Apex Motors",
        "Bluewave Telecom",
        "Granite Bank",
        "Solara Energy",
        "Meridian Retail",
        "Quantix Software",
        "Harbor Shipping",
    ],
    "product": [
        "electric vans",
        "budget phones",
        "frozen meals",
        "solar panels",
        "cloud storage",
        "home loans",
    ],
    "institute": [
        "the University of Leeds",
        "a lab in Zurich",
        "the national space agency",
        "a marine institute",
        "a team at MIT",
        "a hospital research unit",
    ],
    "organism": [
        "honeybees",
        "deep-sea octopuses",
        "desert lizards",
        "wheat plants",
        "gut bacteria",
        "migrating whales",
        "coral reefs",
    ],
    "finding": [
        "sense magnetic fields",
        "survive months without food",
        "repair damaged cells",
        "communicate with sound pulses",
        "adapt quickly to warmer water",
        "store carbon in their roots",
    ],
    "sky_object": ["a distant galaxy", "an icy comet", "a young star", "a gas giant planet", "a black hole"],
    "attraction": [
        "the old town",
        "the harbour walk",
        "the mountain railway",
        "the cathedral square",
        "the night market",
        "the coastal trail",
        "the royal gardens",
    ],
    "transport": ["night train", "ferry", "direct flight", "coach service", "cable car"],
}

_TEMPLATES = {
    "sports": [
        "{team} beat {team2} {n}-{m} in a tense {sport_event} on {day}.",
        "{player} scored twice as {team} won the {competition} {sport_event} in {city}.",
        "The coach of {team} praised the defence after a goalless {sport_event}.",
        "Fans packed the stadium in {city} for the {competition} semi-final.",
        "{player} withdrew from the tournament with a knee injury and will miss {month}.",
        "{team} signed {player} on a three-year contract ahead of the new season.",
        "A late penalty gave {team} a {n}-{m} win and a place in the {competition} final.",
        "{player} set a new record in the 400 metres at the championships in {city}.",
        "After {n} defeats in a row, {team} sacked their manager on {day}.",
        "The referee sent off two players as {team} and {team2} drew {n}-{n}.",
        "Supporters queued overnight for tickets to see {team} play {team2}.",
        "{player} was named best young athlete of the season after {nn} appearances.",
    ],
    "business": [
        "Shares in {company} rose {n} percent after quarterly profits beat forecasts.",
        "{company} plans to cut {nn} jobs as sales of {product} slow in {country}.",
        "The central bank of {country} held interest rates at {n} percent on {day}.",
        "{company} agreed to buy {company2} for {n} billion dollars.",
        "Investors worried about rising inflation as exports from {country} fell in {month}.",
        "{company} reported record revenue from {product} and raised its dividend.",
        "Retail sales in {country} grew {n} percent in {month}, ahead of analyst estimates.",
        "The chief executive of {company} stepped down after a weak year for {product}.",
        "{company} will open a factory near {city} to make {product}, creating {nn} jobs.",
        "Bond markets fell on {day} as traders priced in higher borrowing costs.",
        "{company} warned that profits will shrink because {product} cost more to produce.",
        "Unemployment in {country} fell to {n} percent, the lowest level in a decade.",
    ],
    "science": [
        "Researchers at {institute} found that {organism} can {finding}.",
        "A new telescope captured images of {sky_object} about {nn} light years away.",
        "Scientists sequenced the genome of {organism} to learn how they {finding}.",
        "A study by {institute} suggests that {organism} {finding} better than expected.",
        "Astronomers in {country} detected water vapour around {sky_object}.",
        "{institute} built a microscope that shows proteins folding in real time.",
        "Fossils found near {city} show that early mammals could {finding}.",
        "Physicists at {institute} measured the particle's mass with record precision.",
        "A climate model from {institute} predicts that {organism} will move north by {nn} kilometres.",
        "Engineers tested a probe that will study {sky_object} for {n} years.",
        "Under the microscope, {organism} revealed a structure no biologist had described before.",
        "An experiment at {institute} cooled atoms to a fraction of a degree above absolute zero.",
    ],
    "travel": [
        "The {transport} from {city} to {city2} will run again from {month}.",
        "Visitors to {city} can now explore {attraction} with a free guided tour.",
        "{attraction} of {city} is best seen on foot early in {month}.",
        "Hotel prices in {city} drop sharply once the summer holidays end.",
        "A new {transport} links {city} with the beaches of {country} in under {n} hours.",
        "Travellers to {country} no longer need a visa for stays of up to {nn} days.",
        "Backpackers rate {attraction} in {city} as the highlight of a week in {country}.",
        "The airport in {city} opened a second terminal for holiday flights on {day}.",
        "Seats on the {transport} to {city2} sell out every {month}, so book early.",
        "Campsites along the coast of {country} reopen for tourists in {month}.",
        "Our guide to {city}: where to stay, what to eat and which museums to visit.",
        "Pack light and bring good shoes if you plan to hike near {city2} this {month}.",
    ],
}
_OPENERS = ["", "", "", "On {day}, ", "Reports say that ", "According to local media, ", "In {city}, "]
# First words that stay capitalised after an opener (names); every other first word is lower-cased.
_PROPER_STARTS = {
    name.split()[0] for key in ("team", "player", "company", "city", "country") for name in _FILL[key]
}
_PROPER_STARTS -= {"the"}
_CLOSERS = [
    "",
    "",
    "",
    " Officials confirmed the news on {day}.",
    " More details are expected soon.",
    " The story was first reported in {city}.",
]


def _fill(template: str, rng: random.Random) -> str:
    values = {key: rng.choice(options) for key, options in _FILL.items()}
    values["team2"] = rng.choice([t for t in _FILL["team"] if t != values["team"]])
    values["company2"] = rng.choice([c for c in _FILL["company"] if c != values["company"]])
    values["city2"] = rng.choice([c for c in _FILL["city"] if c != values["city"]])
    values["n"], values["m"], values["nn"] = rng.randint(1, 9), rng.randint(0, 5), rng.randint(10, 900)
    return template.format(**values)


def news_item(rng: random.Random, held_out: bool = False) -> dict:
    """One labelled sample: a topic sentence with an optional opener and closer.

    held_out draws from the last HELD_OUT templates of each topic, which the train split never uses.
    """
    label = rng.choices(sorted(LABEL_WEIGHTS), weights=[LABEL_WEIGHTS[k] for k in sorted(LABEL_WEIGHTS)])[0]
    templates = _TEMPLATES[label][-HELD_OUT:] if held_out else _TEMPLATES[label][:-HELD_OUT]
    sentence = _fill(rng.choice(templates), rng)
    opener = _fill(rng.choice(_OPENERS), rng)
    first = sentence.split()[0]
    if opener and first not in _PROPER_STARTS:
        sentence = sentence[0].lower() + sentence[1:]
    sentence = opener + sentence
    text = sentence[0].upper() + sentence[1:] + _fill(rng.choice(_CLOSERS), rng)
    return {"text": text, "label": label}


def write_news_dataset(directory: Path = NEWS_DIR, seed: int = 0) -> Path:
    """Write train/validation/test JSON Lines files; a text never appears twice in the whole dataset.

    Validation and test sentences are built from templates the train split never uses, so a classifier
    has to recognise what a sentence is about, not a sentence pattern it was trained on.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    directory.mkdir(parents=True, exist_ok=True)
    for split, size in SPLIT_SIZES.items():
        items: list[dict] = []
        while len(items) < size:
            item = news_item(rng, held_out=split != "train")
            if item["text"] not in seen:
                seen.add(item["text"])
                items.append(item)
        lines = [json.dumps(item, ensure_ascii=False) for item in items]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


if __name__ == "__main__":
    print(f"wrote {write_news_dataset()}")
