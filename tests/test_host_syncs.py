"""At most one host sync per optimizer step added by the package, for every registered name usable here, and none
inside backward (a gradient hook): transformers' Trainer pays one (its NaN / inf loss filter). The step's one sync is
its verdict (lightning_optims/finite.py): the loss and the gradients finite, read together before anything is
written. docs/benchmarks.md lists the figure per family (``python benchmarks/host_syncs.py``)."""

from __future__ import annotations

import pytest
import torch

from lightning_optims import get_spec
from lightning_optims.finite import check_loss
from tests.host_syncs import HostSyncs, count
from tests.test_reliability import USABLE

CASES = [(name, norm) for name in USABLE for norm in (1.0, 0.0) if not (get_spec(name).layerwise and norm)]
# the in-backward engine without clipping updates each bucket inside backward: small buckets, several per backward
SMALL_BUCKETS = [("lomo", 0.0), ("adalomo", 0.0), ("lomo", 1.0)]


def test_the_counter_sees_a_read_in_the_package_and_not_elsewhere():
    """The counter counts what the package's code asks for (here ``check_loss``'s ``bool``), not a read of the
    caller's own."""

    class Module:
        trainer = type("T", (), {"world_size": 1})()
        global_step = 0

    with HostSyncs() as syncs:
        syncs.counting = True
        check_loss(Module(), torch.tensor(1.0), "a test")
        float(torch.tensor(2.0))  # (this test's own read)
    assert [(s.where.split(":")[0], s.read) for s in syncs.found] == [("finite.py", "__bool__")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "max_grad_norm"), CASES)
def test_at_most_one_host_sync_per_step_and_none_in_backward(name, max_grad_norm):
    steps = count(name, max_grad_norm)
    assert len(steps) == 4
    assert max(len(found) for found in steps) <= 1, steps
    assert [s for found in steps for s in found if s.in_backward] == []


@pytest.mark.slow
@pytest.mark.parametrize(("name", "max_grad_norm"), SMALL_BUCKETS)
def test_in_backward_buckets_take_no_host_sync(name, max_grad_norm):
    """Buckets of 0.05 MB (several per backward, each updated inside it): still one sync per step, after backward."""
    steps = count(name, max_grad_norm, optim_args="bucket_mb=0.05")
    assert max(len(found) for found in steps) <= 1, steps
    assert [s for found in steps for s in found if s.in_backward] == []
