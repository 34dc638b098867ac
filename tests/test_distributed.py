"""DistributedDataParallel (2 CPU processes, gloo) with fastrnn.RNN inside: the same
parameters after a few SGD steps as one process training on the combined batch."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

WORLD = 2
STEPS = 4
BATCH = 6  # per process; the combined batch is WORLD * BATCH


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fastrnn.RNN(5, 8, num_layers=2, bidirectional=True, nonlinearity="relu")
        self.head = nn.Linear(16, 3)

    def forward(self, x, lengths, packed):
        if packed:
            out, h = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        else:
            out, h = self.rnn(x)
        return self.head(torch.cat([h[-2], h[-1]], 1))


def make_model():
    torch.manual_seed(0)
    return Model().double()


def data(step):
    """The combined batch of one step: x [T, WORLD * BATCH, 5], lengths, targets."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(7, WORLD * BATCH, 5, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 8, (WORLD * BATCH,), generator=g)
    lengths[0] = lengths[BATCH] = 7
    y = torch.randint(0, 3, (WORLD * BATCH,), generator=g)
    return x, lengths, y


def train(model, rank=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, lengths, y = data(step)
        if rank is not None:  # this process's share of the combined batch
            part = slice(rank * BATCH, (rank + 1) * BATCH)
            x, lengths, y = x[:, part], lengths[part], y[part]
        # mean loss per process; DDP averages the gradients over processes, which is the
        # mean over the combined batch, as the processes' batches are equal in size
        loss = nn.functional.cross_entropy(model(x, lengths, packed=step % 2 == 1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        assert type(model.module.rnn) is fastrnn.RNN
        train(model, rank)
        torch.save({k: v.detach() for k, v in model.module.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # Neither rank tears its gloo pairs down while the other may still use them (a
        # rank that did aborted now and then: "terminate called without an active
        # exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = train(make_model())
    initial = make_model().state_dict()
    expected = single.state_dict()
    for name, want in expected.items():
        for rank, state in enumerate(states):
            # every process holds the same parameters ...
            assert torch.equal(state[name], states[0][name]), (name, rank)
            # ... which are those of one process on the combined batch
            torch.testing.assert_close(state[name], want, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name}, rank {rank}: {m}")
        assert not torch.equal(want, initial[name]), f"{name} did not train"
