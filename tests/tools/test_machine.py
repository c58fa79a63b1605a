import torch

from tools.bench import machine


def test_commit_env_overrides_git(monkeypatch):
    monkeypatch.setenv("TANDEM_GIT_COMMIT", "abc123")
    assert machine.git_commit() == "abc123"
    assert machine.git_dirty() is None
    env = machine.environment(torch.device("cpu"))
    assert (env["git_commit"], env["git_dirty"]) == ("abc123", None)
    monkeypatch.setenv("TANDEM_GIT_COMMIT", "")  # empty: ignored, git is asked
    assert machine.git_commit() != ""


def test_git_dirty_is_bool_or_none(monkeypatch):
    monkeypatch.delenv("TANDEM_GIT_COMMIT", raising=False)
    for dirty in (machine.git_dirty(), machine.environment(torch.device("cpu"))["git_dirty"]):
        assert dirty is None or isinstance(dirty, bool)
