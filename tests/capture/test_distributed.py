"""DDP (DPDDP + DistributedDPOptimizer, gloo, 2 CPU processes): rank 0 audits the global sum."""

import json
import os
import socket
import statistics

import pytest
import torch
import torch.multiprocessing as mp

from opacus_dmaudit.assets.data import mnist_5k_split

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, sigma, steps):
    import torch.distributed as dist
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    from opacus_dmaudit import DMAuditor
    from tests.helpers import imprint_model, make_private, train_steps

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        split = mnist_5k_split()
        x, y = split["private"]
        model = DPDDP(imprint_model(split["prior"][0][:1000], num_bins=128, seed=0))
        seen = []  # this rank's real batches, to check rank 0 recovered both ranks' samples
        model.module[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        model, opt, loader, engine = make_private(model, x, y, sigma=sigma)
        auditor = DMAuditor(
            privacy_engine=engine,
            log_dir=os.path.join(out_dir, "log"),
            every_n_steps=1,
            metrics=("mse",),
            tensorboard=False,
            report=False,
        ).attach(opt)
        truths = []  # rank 0: the real images of each audited step (the ground truth)

        def keep_truth(step):
            truths.append(auditor.last_result.truth.clone())

        train_steps(model, opt, loader, steps, keep_truth if rank == 0 else None)
        auditor.close()
        torch.save(
            {"seen": seen, "truths": truths, "history": auditor.history},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _run(tmp_path, sigma, steps):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), sigma, steps), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_rank0_recovers_the_singletons_of_both_ranks_exactly(tmp_path):
    r0, r1 = _run(tmp_path, sigma=0.0, steps=2)
    assert r1["history"] == [] and not (tmp_path / "log" / "rank1").exists()
    _no_failed_checks(r0["history"])
    assert [r.step for r in r0["history"]] == [1, 2]
    for step, record in enumerate(r0["history"]):
        assert record.batch_size == r0["seen"][step].shape[0] + r1["seen"][step].shape[0]
        assert record.counts.lone_found == record.counts.lone_in_batch > 10
        singles = [im for im in record.images if im.true_count == 1]
        assert singles and max(im.metric("mse", "raw") for im in singles) < 1e-9
        # every recovered image is a real sample of one of the two ranks' batches
        owners = set()
        for img in r0["truths"][step]:
            for rank, run in enumerate((r0, r1)):
                if (run["seen"][step] == img).flatten(1).all(dim=1).any():
                    owners.add(rank)
        assert owners == {0, 1}
    assert json.loads((tmp_path / "log" / "audit.jsonl").read_text().splitlines()[0])["step"] == 1


def _no_failed_checks(history):
    """Every audit ran the mechanism checks on the global batch, and none failed."""
    for record in history:
        statuses = {c.name: c.status for c in record.checks}
        assert {"noise_scale", "noise_shape", "clipping", "sampling", "accountant"} <= set(statuses)
        assert "fail" not in statuses.values(), record.checks


def test_measured_noise_matches_the_prediction_under_ddp(tmp_path):
    r0, _ = _run(tmp_path, sigma=0.005, steps=3)
    _no_failed_checks(r0["history"])
    ratios = [
        im.residual_std_raw / im.noise_std
        for r in r0["history"]
        for im in r.images
        if im.true_count == 1 and im.residual_std_raw is not None
    ]
    assert len(ratios) >= 30
    assert 0.85 < statistics.mean(ratios) < 1.15
