"""fastrnn.RNN as a module: interchangeable with torch.nn.RNN (state_dict,
convert, repr, copies, devices and dtypes), the same errors, edge sizes."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import fastrnn

from conftest import TOL, assert_close_all, grads, lengths_for, pack, rnn_pair, weighted_sum


def test_parameters_and_init_like_torch():
    torch.manual_seed(0)
    ref = nn.RNN(7, 5, 3, bidirectional=True)
    torch.manual_seed(0)
    fast = fastrnn.RNN(7, 5, 3, bidirectional=True)
    names = [n for n, _ in ref.named_parameters()]
    assert names == [n for n, _ in fast.named_parameters()]
    assert "weight_hh_l1_reverse" in names and "bias_ih_l0" in names
    for (_, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b)  # same init, same RNG draws
    assert repr(fast) == repr(ref)


def test_positional_constructor_matches_torch():
    args = (4, 6, 2, "relu", False, True, 0.25, True)
    ref, fast = nn.RNN(*args), fastrnn.RNN(*args)
    for attr in ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias",
                 "batch_first", "dropout", "bidirectional"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    fast64 = fastrnn.RNN(4, 6, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in fast64.parameters())


@pytest.mark.parametrize("direction", ["torch->fastrnn", "fastrnn->torch"])
def test_state_dict_loads_both_ways(direction):
    src = (nn.RNN if direction.startswith("torch") else fastrnn.RNN)(3, 5, 2, bidirectional=True)
    dst = (fastrnn.RNN if direction.startswith("torch") else nn.RNN)(3, 5, 2, bidirectional=True)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(dst(x)[0], src(x)[0])


def test_convert_in_place_keeps_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(28, 16, 2, batch_first=True)
            self.inner = nn.Sequential(nn.RNN(16, 8, nonlinearity="relu"))
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            y, _ = self.rnn(x)
            y, _ = self.inner[0](y.transpose(0, 1))
            return self.head(y[-1])

    model = Model()
    x = torch.randn(3, 5, 28)
    expected = model(x)
    params = list(model.parameters())
    rnn_before = model.rnn
    assert fastrnn.convert(model) is model
    assert type(model.rnn) is fastrnn.RNN and type(model.inner[0]) is fastrnn.RNN
    assert model.rnn is rnn_before
    assert all(a is b for a, b in zip(params, model.parameters()))
    torch.testing.assert_close(model(x), expected)
    assert fastrnn.convert(nn.RNN(2, 3)).__class__ is fastrnn.RNN


def test_convert_leaves_other_modules_alone():
    class MyRNN(nn.RNN):
        pass

    model = nn.Sequential(MyRNN(2, 3), nn.LSTM(2, 3), nn.GRU(2, 3))
    fastrnn.convert(model)
    assert [type(m) for m in model] == [MyRNN, nn.LSTM, nn.GRU]


def test_copies_pickle_and_save():
    rnn = fastrnn.RNN(3, 4, 2, nonlinearity="relu")
    x = torch.randn(5, 2, 3)
    expected = rnn(x)[0]
    for clone in (copy.deepcopy(rnn), pickle.loads(pickle.dumps(rnn))):
        assert type(clone) is fastrnn.RNN
        torch.testing.assert_close(clone(x)[0], expected)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], expected)


def test_to_dtype_and_flatten_parameters():
    ref, fast = rnn_pair(3, 4, 2)
    ref, fast = ref.double(), fast.to(torch.float64)
    fast.flatten_parameters()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert_close_all(fast(x), ref(x), torch.float64)


def test_functional_call_uses_the_given_parameters():
    ref, fast = rnn_pair(3, 4)
    new = {k: torch.randn_like(v) for k, v in fast.state_dict().items()}
    x = torch.randn(5, 2, 3)
    out = torch.func.functional_call(fast, new, (x,))
    expected = torch.func.functional_call(ref, new, (x,))
    assert_close_all(out, expected, torch.float32)
    # and the module's own parameters are untouched
    assert_close_all(fast(x), ref(x), torch.float32)


def test_bfloat16_error_within_torch_own():
    ref, fast = rnn_pair(16, 32, 2)
    x = torch.randn(12, 4, 16)
    exact = copy.deepcopy(ref).double()(x.double())
    errs = []
    for module in (ref, fast):
        out, h = copy.deepcopy(module).bfloat16()(x.bfloat16())
        assert out.dtype == torch.bfloat16
        errs.append(max((out.double() - exact[0]).abs().max(), (h.double() - exact[1]).abs().max()))
    assert errs[1] <= 2 * errs[0] + 1e-3, errs


def test_bfloat16_gradients_within_torch_own():
    ref, fast = rnn_pair(8, 16)
    x = torch.randn(6, 3, 8)
    exact_mod = copy.deepcopy(ref).double()
    exact = grads(exact_mod, weighted_sum(*exact_mod(x.double())), [])
    errs = []
    for module in (ref, fast):
        m = copy.deepcopy(module).bfloat16()
        g = grads(m, weighted_sum(*m(x.bfloat16())), [])
        errs.append(max((a.double() - e).abs().max() / e.abs().max() for a, e in zip(g, exact)))
    assert errs[1] <= 2 * errs[0] + 1e-2, errs


@pytest.mark.parametrize("num_layers", [2, 3])
def test_dropout_between_layers(num_layers):
    # dropout=1 zeroes every layer's output but the last, so the last layer sees
    # zeros: deterministic, and torch.nn.RNN must agree.
    ref, fast = rnn_pair(3, 4, num_layers, dropout=1.0)
    x = torch.randn(5, 2, 3)
    assert_close_all(fast(x), ref(x), torch.float32)
    # p = 0.5: training output differs from eval, and eval equals torch.
    ref, fast = rnn_pair(3, 4, num_layers, dropout=0.5)
    torch.manual_seed(0)
    train_out = fast(x)[0]
    fast.eval(), ref.eval()
    eval_out = fast(x)[0]
    assert not torch.allclose(train_out, eval_out)
    assert_close_all(fast(x), ref(x), torch.float32)


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="dropout option adds dropout after all but last"):
        fastrnn.RNN(3, 4, 1, dropout=0.5)


@pytest.mark.parametrize(
    "steps, batch, hidden, layers",
    [(1, 3, 4, 2), (6, 1, 4, 2), (6, 3, 1, 2), (1000, 2, 8, 1)],
    ids=["T=1", "batch=1", "hidden=1", "T=1000"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_edge_sizes(steps, batch, hidden, layers, dtype):
    ref, fast = rnn_pair(3, hidden, layers, bidirectional=True)
    ref, fast = ref.to(dtype), fast.to(dtype)
    x = torch.randn(steps, batch, 3, dtype=dtype, requires_grad=True)
    results = []
    for m in (ref, fast):
        out, h = m(x)
        results.append([out, h, *grads(m, weighted_sum(out, h), [x])])
    tol = TOL[dtype] if steps < 1000 else dict(rtol=1e-3, atol=1e-4)
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, **tol)


def test_non_contiguous_inputs_and_weights():
    ref, fast = rnn_pair(4, 6, 2, batch_first=True)
    with torch.no_grad():
        for name, p in list(fast.named_parameters()):
            if p.dim() == 2:  # same values, transposed storage
                setattr(fast, name, nn.Parameter(p.detach().t().contiguous().t()))
                assert not getattr(fast, name).is_contiguous()
    base = torch.randn(3, 5, 8, dtype=torch.float32)  # batch_first: [B, T, 2 * I]
    x = base[:, :, ::2].requires_grad_()  # non-contiguous view
    h0 = torch.randn(3, 2, 6).transpose(0, 1)  # non-contiguous [L, B, H]
    assert not x.is_contiguous() and not h0.is_contiguous()
    results = []
    for m in (ref, fast):
        out, h = m(x, h0)
        results.append([out, h, *grads(m, weighted_sum(out, h), [x])])
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, **TOL[torch.float32])


def test_packed_sorted_and_unsorted():
    ref, fast = rnn_pair(3, 5, 2, bidirectional=True)
    x = torch.randn(7, 4, 3)
    lengths = torch.tensor([7, 5, 5, 2])
    for enforce_sorted in (True, False):
        lens = lengths if enforce_sorted else lengths[[2, 0, 3, 1]]
        p = nn.utils.rnn.pack_padded_sequence(x, lens, enforce_sorted=enforce_sorted)
        (o1, h1), (o2, h2) = fast(p), ref(p)
        torch.testing.assert_close(o1.data, o2.data)
        torch.testing.assert_close(h1, h2)


def rnn_errors():
    """(description, callable) pairs that must raise exactly what torch.nn.RNN raises."""
    x = torch.randn(5, 2, 3)
    return {
        "bad nonlinearity": lambda cls: cls(3, 4, nonlinearity="sigmoid"),
        "dropout > 1": lambda cls: cls(3, 4, dropout=1.5),
        "dropout < 0": lambda cls: cls(3, 4, dropout=-0.1),
        "dropout bool": lambda cls: cls(3, 4, dropout=True),
        "hidden_size 0": lambda cls: cls(3, 0),
        "hidden_size negative": lambda cls: cls(3, -1),
        "num_layers 0": lambda cls: cls(3, 4, num_layers=0),
        "input_size 0": lambda cls: cls(0, 4),
        "hidden_size float": lambda cls: cls(3, 4.0),
        "proj_size": lambda cls: cls(3, 4, proj_size=2),
        "wrong input size": lambda cls: cls(3, 4)(torch.randn(5, 2, 7)),
        "4-D input": lambda cls: cls(3, 4)(torch.randn(5, 2, 3, 1)),
        "1-D input": lambda cls: cls(3, 4)(torch.randn(3)),
        "input dtype": lambda cls: cls(3, 4)(x.double()),
        "hx dtype": lambda cls: cls(3, 4)(x, torch.zeros(1, 2, 4, dtype=torch.float64)),
        "hx layers": lambda cls: cls(3, 4)(x, torch.zeros(2, 2, 4)),
        "hx batch": lambda cls: cls(3, 4)(x, torch.zeros(1, 3, 4)),
        "hx hidden": lambda cls: cls(3, 4)(x, torch.zeros(1, 2, 5)),
        "hx 2-D for batched": lambda cls: cls(3, 4)(x, torch.zeros(2, 4)),
        "hx 3-D for unbatched": lambda cls: cls(3, 4)(x[:, 0], torch.zeros(1, 1, 4)),
        "empty sequence": lambda cls: cls(3, 4)(torch.randn(0, 2, 3)),
        "packed hx batch": lambda cls: cls(3, 4)(
            nn.utils.rnn.pack_padded_sequence(x, [5, 3]), torch.zeros(1, 3, 4)),
    }


@pytest.mark.parametrize("name", list(rnn_errors()))
def test_errors_match_torch(name):
    make = rnn_errors()[name]
    with pytest.raises(Exception) as expected:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make(nn.RNN)
    with pytest.raises(type(expected.value)) as got:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make(fastrnn.RNN)
    assert str(got.value) == str(expected.value)


def test_empty_batch_like_torch():
    ref, fast = rnn_pair(3, 4, 2)
    x = torch.randn(5, 0, 3)
    (o1, h1), (o2, h2) = fast(x), ref(x)
    assert o1.shape == o2.shape == (5, 0, 4) and h1.shape == h2.shape == (2, 0, 4)
