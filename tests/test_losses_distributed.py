"""Two real processes (torchrun + Accelerator(cpu=True), gloo) with batch b each vs one process with 2b.

The statement tested, for every case in tests/dist_workers/loss_worker.py: the mean of the per-rank losses
equals the single-process loss on the global batch; after the trainer's all_reduce_mean_ of parameter
gradients, the weight and logit-scale (and SigLIP bias) gradients equal the single-process ones; each rank's
gradient w.r.t. its own features is world_size times the single-process one (open_clip's gather without
autograd is the documented exception: weight gradients come out 1/world_size).
"""


import pytest
import torch
from conftest import load_worker, run_worker



worker = load_worker("loss_worker")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "losses.json"
    return run_worker("loss_worker", out, worker.WORLD)


@pytest.mark.slow
def test_two_real_processes_ran_on_gloo(two_process_results):
    assert two_process_results["ranks"] == [0, 1]
    assert two_process_results["backend"] == "gloo"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_two_processes_equal_one_process_with_global_batch(two_process_results, name):
    distributed = {key: torch.tensor(value) for key, value in two_process_results["cases"][name].items()}
    single = worker.run_case(name, slice(None))
    factors = worker.CASES[name][1]
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distributed["loss"], single["loss"], **close)
    torch.testing.assert_close(distributed["grad_weight"], factors["weight"] * single["grad_weight"], **close)
    torch.testing.assert_close(distributed["grad_t"], factors["t"] * single["grad_t"], **close)
    torch.testing.assert_close(distributed["grad_bias"], single["grad_bias"], **close)
    for key in ("grad_image", "grad_text"):
        torch.testing.assert_close(distributed[key], factors["features"] * single[key], **close)
    assert set(distributed) == set(single)
    for key in set(single) - {"loss", "grad_weight", "grad_t", "grad_bias", "grad_image", "grad_text"}:
        torch.testing.assert_close(distributed[key], single[key].float(), **close)  # e.g. the MoCo queue


@pytest.mark.slow
def test_gradients_are_not_trivially_zero(two_process_results):
    for name in ("clip", "siglip_ring", "ntxent", "moco", "supcon", "ntxent_hcl", "clip_hcl", "vse_max",
                 "clip_label_positives"):
        assert torch.tensor(two_process_results["cases"][name]["grad_weight"]).abs().max() > 1e-4
    assert abs(two_process_results["cases"]["siglip_ring"]["grad_bias"]) > 1e-4


@pytest.mark.slow
def test_unequal_batch_sizes_raise_on_every_rank(two_process_results):
    for message in two_process_results["unequal_errors"]:
        assert "rank 0 has 3" in message and "rank 1 has 2" in message
