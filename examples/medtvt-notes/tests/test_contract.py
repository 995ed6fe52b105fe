"""The medtvt contract kit run on this distribution's plugins."""

from medtvt_core.testing import EncoderContract, ModalityContract


class TestNoteModality(ModalityContract):
    plugin_name = "note"


class TestNoteEncoder(EncoderContract):
    plugin_name = "note-hash"


def test_note_reads_text(tmp_path):
    from medtvt_notes.plugin import NoteModality

    (tmp_path / "a.txt").write_text("fever, productive cough, crackles at the right base")
    x = NoteModality(n_features=64).load("a.txt", root=tmp_path)
    assert x.shape == (64,) and x.abs().sum() > 0
