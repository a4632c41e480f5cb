"""WordNet 3.0 supersense classification: each synset's gloss labelled by its lexicographer file.

A real labelled text task that works offline: Debian's ``wordnet-base`` installs the WordNet
database in ``/usr/share/wordnet``. In ``data.noun`` (about 82 000 synsets) and ``data.verb``
(about 13 800) each synset is one line::

    02084071 05 n 03 dog 0 domestic_dog 0 ... | a member of the genus Canis ...; "the dog barked"

The first field is the synset offset, the second the lexicographer file number (``05`` is
``noun.animal``), and the gloss follows ``" | "``. The text of an example is the gloss; its label
is the lexicographer file (26 noun classes, 15 verb classes). Lines starting with two spaces are
the licence header.

The test split is fixed and derived from the synset offset only (never from the text):
a synset is in the test split when the SHA-256 of its 8-digit offset, read as an integer,
is 0 modulo 10 (about 10 % of the synsets). The class list is public: the lexicographer file
names of WordNet's documentation, in file-number order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "LEXNAMES",
    "WORDNET_DATASETS",
    "WordNetSplit",
    "is_test_offset",
    "load_wordnet",
    "parse_synset_line",
]

DEFAULT_DIR = "/usr/share/wordnet"
INSTALL_HINT = (
    "install Debian's WordNet database with `sudo apt-get install -y wordnet-base` (it puts "
    "data.noun and data.verb in /usr/share/wordnet), or pass --data-dir with a folder that "
    "holds them"
)

# The lexicographer files of WordNet 3.0 (lexnames(5WN)), indexed by file number.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

# dataset name -> (file, part of speech prefix of its lexicographer files)
WORDNET_DATASETS = {
    "wordnet-nouns": ("data.noun", "noun."),
    "wordnet-verbs": ("data.verb", "verb."),
}
TEST_BUCKETS = 10  # one bucket of ten goes to the test split


@dataclass
class WordNetSplit:
    """Glosses and labels of one split.

    Attributes:
        texts: The glosses.
        labels: int64 tensor (N,) of class indices into ``label_names``.
        offsets: The synset offsets (the examples' identity; sorted ascending).
        label_names: The lexicographer file names of the task, in class order.
    """

    texts: list[str]
    labels: torch.Tensor
    offsets: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def parse_synset_line(line: str) -> tuple[int, int, str] | None:
    """``(offset, lexicographer file number, gloss)`` of a data-file line; None for the header.

    Raises:
        ValueError: If the line is neither a licence line nor a synset line with a gloss.
    """
    if line.startswith("  ") or not line.strip():
        return None
    fields = line.split(" ", 2)
    head, sep, gloss = line.partition(" | ")
    if len(fields) < 3 or not sep or not fields[0].isdigit() or not fields[1].isdigit():
        raise ValueError(f"not a WordNet synset line: {line[:80]!r}")
    return int(fields[0]), int(fields[1]), gloss.strip()


def is_test_offset(offset: int) -> bool:
    """True when the synset with this offset belongs to the fixed test split (~10 %)."""
    digest = hashlib.sha256(f"{offset:08d}".encode()).hexdigest()
    return int(digest, 16) % TEST_BUCKETS == 0


def load_wordnet(
    name: str = "wordnet-nouns", data_dir: str | Path | None = None
) -> tuple[WordNetSplit, WordNetSplit]:
    """Read a WordNet supersense task: ``(train, test)``.

    Args:
        name: ``wordnet-nouns`` (26 classes) or ``wordnet-verbs`` (15 classes).
        data_dir: Folder with ``data.noun`` / ``data.verb`` (default ``/usr/share/wordnet``).

    Raises:
        ValueError: For an unknown name, or a file that is not in WordNet's data format.
        FileNotFoundError: If the data file is missing (the message gives the install command).
    """
    if name not in WORDNET_DATASETS:
        raise ValueError(
            f"unknown WordNet dataset {name!r}; choose one of {list(WORDNET_DATASETS)}"
        )
    filename, prefix = WORDNET_DATASETS[name]
    path = Path(data_dir or DEFAULT_DIR) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {str(path)!r} does not exist; {INSTALL_HINT}")
    label_names = [n for n in LEXNAMES if n.startswith(prefix)]
    first = LEXNAMES.index(label_names[0])
    parts: dict[bool, tuple[list[str], list[int], list[int]]] = {
        False: ([], [], []),
        True: ([], [], []),
    }
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                parsed = parse_synset_line(line)
            except ValueError as err:
                raise ValueError(f"{str(path)!r} line {lineno}: {err}") from None
            if parsed is None:
                continue
            offset, lexfile, gloss = parsed
            if not first <= lexfile < first + len(label_names):
                raise ValueError(
                    f"{str(path)!r} line {lineno}: lexicographer file {lexfile} is not a "
                    f"{prefix[:-1]} file ({first}..{first + len(label_names) - 1})"
                )
            texts, labels, offsets = parts[is_test_offset(offset)]
            texts.append(gloss)
            labels.append(lexfile - first)
            offsets.append(offset)
    if not parts[False][0] or not parts[True][0]:
        raise ValueError(f"{str(path)!r} holds too few synsets for a train and a test split")
    train, test = (
        WordNetSplit(t, torch.tensor(lab, dtype=torch.int64), off, label_names)
        for t, lab, off in (parts[False], parts[True])
    )
    return train, test
