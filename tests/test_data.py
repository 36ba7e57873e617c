"""Calibration and evaluation windows."""
import pytest
import torch

from slimlm.core.data import calibration_windows, eval_windows, load_text
from slimlm.errors import SlimlmError


def test_eval_windows_are_non_overlapping_from_the_start():
    tokens = torch.arange(1000)
    w = eval_windows(tokens, 128)
    assert w.shape == (7, 128)
    assert torch.equal(w.flatten(), tokens[: 7 * 128])
    assert eval_windows(tokens, 128, max_windows=2).shape == (2, 128)


def test_first_sampling_takes_leading_windows():
    tokens = torch.arange(1000)
    w = calibration_windows(tokens, 3, 100, "first")
    assert torch.equal(w, tokens[:300].view(3, 100))


def test_random_sampling_is_seeded_and_in_range():
    tokens = torch.arange(5000)
    a = calibration_windows(tokens, 8, 64, "random", seed=3)
    b = calibration_windows(tokens, 8, 64, "random", seed=3)
    c = calibration_windows(tokens, 8, 64, "random", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # each window is a contiguous slice


def test_too_little_text_is_an_error():
    with pytest.raises(SlimlmError, match="need 2000"):
        calibration_windows(torch.arange(1000), 20, 100, "first")
    with pytest.raises(SlimlmError, match="fewer than one window"):
        eval_windows(torch.arange(10), 128)
    with pytest.raises(SlimlmError, match="unknown calibration sampling"):
        calibration_windows(torch.arange(1000), 2, 10, "middle")


def test_offline_folder_and_text_files(data_dir, tmp_path):
    assert load_text("wikitext2", "test", data_dir).startswith(" = Robert Boulter = ")
    assert "<unk>" in load_text("wikitext2", "calib", data_dir)[:5000]
    f = tmp_path / "mine.txt"
    f.write_text("hello world")
    assert load_text(str(f), "calib") == "hello world"
    with pytest.raises(SlimlmError, match="unknown data source"):
        load_text(str(tmp_path / "missing.txt"), "calib")
    with pytest.raises(SlimlmError, match="data folder not found"):
        load_text("wikitext2", "test", str(tmp_path / "nope"))
