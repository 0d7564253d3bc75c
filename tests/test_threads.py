"""Tiny models sample on one CPU thread and leave the process's thread setting as they found it."""
import torch

from lumina_core.pipeline import LuminaPipeline
from lumina_core.request import Request
from lumina_core.sampling import SamplingConfig
from lumina_core.threads import SMALL_MODEL_PARAMETERS, cpu_threads, threads_for


def test_threads_for_small_and_large_models():
    assert threads_for(3_600_000, "cpu") == 1
    assert threads_for(7_000_000_000, "cpu") == torch.get_num_threads()
    assert threads_for(SMALL_MODEL_PARAMETERS - 1, "meta") == torch.get_num_threads()  # not a CPU run


def test_the_demo_samples_on_one_thread_and_restores_the_setting():
    pipe = LuminaPipeline.from_pretrained("demo", device="cpu")
    before = torch.get_num_threads()
    seen = []
    with cpu_threads(2):  # what ComfyUI or a user set
        pipe.generate(Request(task="t2i", prompt="a red circle in the top left", width=64, height=64),
                      SamplingConfig(cfg=1.5, guidance="constant", top_k=50),
                      progress=lambda done, total, partial: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == 2
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
