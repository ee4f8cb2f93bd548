"""Shared fixtures. Tests never touch a model hub: HF_HUB_OFFLINE is forced before anything imports huggingface."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs the suite on 2 xdist workers (one per core of CI): each worker, and every process it starts, gets
# one intra-op thread, since two workers with two threads each oversubscribe the cores and stall
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_path():
    """Folder of the tiny epsilon-prediction StableDiffusionPipeline (built once, cached)."""
    from guidance.tiny import tiny_model_path
    return tiny_model_path("epsilon")


@pytest.fixture(scope="session")
def tiny_v_path():
    """Folder of the tiny v-prediction StableDiffusionPipeline."""
    from guidance.tiny import tiny_model_path
    return tiny_model_path("v_prediction")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_path):
    """The tiny pipeline loaded through the production loading call (read-only: do not mutate)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (restored after): as fast for the tiny UNet, and two threads stall badly when
    other jobs share the two cores. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the longest files first: `make test`'s two xdist workers take whole files in collection order, so a long file
# collected last would run alone at the end (the toy regression run is ~2-4 min on one thread)
LONGEST_FIRST = ("test_toy_regression.py", "test_batch.py", "test_reliability.py", "test_toyworld.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order
