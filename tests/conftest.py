"""Shared fixtures: the real data under ../shared (skipped when absent) and the reduced miniature (built once)."""
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SHARED = Path(__file__).parents[2] / "shared"   # ../shared from the repo root: real data, never copied in
TESTS_DATA = Path(__file__).parent / "data"     # small committed fixtures (tiny.mp4)


@pytest.fixture(scope="session")
def shared():
    """The ../shared folder; tests that use it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (real data for tests lives outside the repo)")
    return SHARED


def shared_file(shared, name):
    """One file under ../shared/data, or skip."""
    path = shared / "data" / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def ohofg_path(shared):
    return shared_file(shared, "OHOFG.mp4")


@pytest.fixture(scope="session")
def ohofg(ohofg_path):
    """OHOFG.mp4 decoded once at the default 2 fps: (frames, metadata)."""
    import data
    return data.load_video(str(ohofg_path))


@pytest.fixture(scope="session")
def shipped():
    """The miniature shipped in miniature/ (the trained models every script defaults to): its paths dict."""
    from lib import miniature
    return miniature.miniature_paths(miniature.MINIATURE)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The reduced miniature (a few seconds to build): paths dict with student, teacher, train, test, metrics."""
    from lib import miniature
    return miniature.build(str(tmp_path_factory.mktemp("toy")), miniature.ToyConfig.reduced())


@pytest.fixture(scope="session")
def tiny_processor(tiny):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny["student"])


@pytest.fixture(scope="session")
def teacher(tiny):
    """(model, processor) of the miniature teacher through rollout.load_model, the path real checkpoints take."""
    import rollout
    return rollout.load_model(tiny["teacher"])


@pytest.fixture(scope="session")
def tiny_test(tiny):
    """The miniature's first 4 test samples and their decoded videos."""
    import data
    samples = data.load_annotations(tiny["test"])[:4]
    return samples, [data.load_video(s.video) for s in samples]
