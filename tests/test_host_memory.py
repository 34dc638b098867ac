"""The CPU tensors the ops return come from blocks fastrnn keeps between calls
(csrc/host_blocks.h): a training loop stops faulting its outputs in afresh, and the
blocks are never handed out while a tensor still holds them, whichever thread frees it."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import fastrnn

# torch_from_blob with a deleter, which keeping the blocks needs, came in torch 2.11.
needs_kept_blocks = pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 11),
    reason="returned tensors come from torch's allocator before torch 2.11")


def _training_step(model, x):
    out, state = model(x)
    states = state if isinstance(state, tuple) else (state,)
    # Sums' gradients are expanded scalars: the step allocates nothing big besides the ops.
    (out.sum() + sum(s.sum() for s in states)).backward()
    for p in model.parameters():
        p.grad = None


@needs_kept_blocks
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts minor page faults (Linux)")
@pytest.mark.parametrize("cell", [fastrnn.RNN, fastrnn.LSTM, fastrnn.GRU])
def test_training_steps_fault_in_no_new_pages(cell):
    """A 2-layer stack's step returns about 3 MB (output, reserve); glibc trimmed them
    from its heap on every step, and the next step faulted them in again (hundreds of
    faults a step). After warm-up a step now faults in almost nothing."""
    import resource

    torch.manual_seed(0)
    model = cell(28, 128, 2, batch_first=True)
    x = torch.randn(100, 28, 28)
    for _ in range(5):
        _training_step(model, x)
    steps = 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        _training_step(model, x)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
    assert faults < 32, f"{faults:.0f} minor page faults a step"


def _raw_forward(x, hx, weights):
    return torch.ops.fastrnn.rnn(x, hx, weights, True, 1, 0.0, False, False, "tanh", None)[0]


def _weights(H, I):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(H, I, generator=g) * 0.1, torch.randn(H, H, generator=g) * 0.1,
            torch.randn(H, generator=g), torch.randn(H, generator=g)]


def test_returned_tensors_keep_their_blocks_while_alive():
    """Outputs alive at once never share memory, and one freed and re-taken by the next
    call's output leaves the live ones as they were."""
    x, hx, w = torch.randn(16, 32, 8), torch.zeros(1, 32, 64), _weights(64, 8)
    kept = [_raw_forward(x * (i + 1), hx, w) for i in range(4)]  # 128 KB each
    copies = [k.clone() for k in kept]
    assert len({k.data_ptr() for k in kept}) == len(kept)
    del kept[1], copies[1]
    again = [_raw_forward(x * -2, hx, w) for _ in range(3)]
    for k, c in zip(kept, copies):
        assert torch.equal(k, c)
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in kept + again]
    spans.sort()
    assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:]))
    expected = _raw_forward(x * -2, hx, w)
    for t in again:
        assert torch.equal(t, expected)


def test_returned_tensors_freed_on_other_threads():
    """Threads calling the op and freeing each other's outputs: every output is the
    single-threaded result, and nothing crashes."""
    x, hx, w = torch.randn(16, 32, 8), torch.zeros(1, 32, 64), _weights(64, 8)
    expected = [_raw_forward(x * (i + 1), hx, w) for i in range(4)]
    handed = []
    lock = threading.Lock()
    errors = []

    def work(i):
        try:
            for _ in range(30):
                out = _raw_forward(x * (i + 1), hx, w)
                if not torch.equal(out, expected[i]):
                    errors.append(f"thread {i}: wrong output")
                with lock:
                    handed.append(out)  # freed by whichever thread pops it
                    if len(handed) > 3:
                        handed.pop(0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_returned_tensor_outlives_the_interpreter():
    """A tensor still alive while the process exits is freed into a keeper that is
    never destroyed: the process exits cleanly."""
    code = ("import torch, fastrnn\n"
            "m = fastrnn.RNN(8, 64)\n"
            "KEPT = m(torch.randn(16, 32, 8))\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
