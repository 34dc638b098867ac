"""Python side of the fastrnn ops: typed wrappers, shapes for tracing
(register_fake), autograd (register_autograd), the ops' batching rules
(register_vmap), autocast, and the routes of higher-order autograd and forward-mode
AD to recomputations (torch.nn's own, fastrnn.reference). The ops, their contracts
and every argument check are in csrc/ (ops.h, checks.h).

Three op pairs share one engine and one shape: ``rnn`` (Elman), ``lstm`` and
``gru``, each with its ``*_backward``. Their arguments are
``(input, *states, weights, has_biases, num_layers, dropout, train,
bidirectional[, nonlinearity], batch_sizes)``, where states is (hx,) or, for
LSTM, (hx, cx); they return ``(output, *final states, reserve)``. The forward
ops take one more, ``need_reserve`` (default True): False where no backward
will follow, which returns an empty reserve and saves its memory.
"""

import inspect
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import _loader
from .reference import gru_reference, lstm_reference, rnn_reference

_ops = torch.ops.fastrnn
# op name -> how many state tensors it takes (hx; hx and cx) and its gate count
_STATES = {"rnn": 1, "lstm": 2, "gru": 1}
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _check_cuda_built(input):
    if isinstance(input, Tensor) and input.is_cuda and not _loader.cuda_loaded:
        raise RuntimeError(
            "fastrnn was built without CUDA kernels, so it cannot run on CUDA tensors; "
            f"rebuild with a CUDA toolkit present (FASTRNN_CUDA=1): {_loader.REBUILD}"
        )


def _has_biases(weights, num_layers, bidirectional):
    # torch.nn's flat weights have 2 per layer and direction without biases
    # (3 with LSTM's projection), 4 with them (5).
    per_cell = len(weights) // (num_layers * (2 if bidirectional else 1))
    return per_cell in (4, 5)


def _dropout_applied(num_layers, dropout, train):
    """Whether a call draws dropout masks between its layers (csrc/ops.h)."""
    return train and dropout > 0 and num_layers > 1


def _output_width(bidirectional, hx):
    """A layer's output features, D * H (LSTM with proj_size: D * proj_size)."""
    return (2 if bidirectional else 1) * hx.shape[-1]


def rnn(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    nonlinearity: str = "tanh",
    dropout: float = 0.0,
    train: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """A whole Elman RNN stack over a whole sequence, in one op call.

    input: [T, B, I] time-major, or packed [N, I] rows with ``batch_sizes`` [T]
    (the layout of PackedSequence.data); hx: [num_layers * D, B, H];
    weights: torch.nn.RNN's ``_flat_weights`` (per layer and direction
    weight_ih, weight_hh and, if any, bias_ih, bias_hh). ``dropout`` applies
    between layers when ``train``. Returns (output [T, B, D*H] or [N, D*H],
    h_n [num_layers * D, B, H]).
    """
    _check_cuda_built(input)
    config = (_has_biases(weights, num_layers, bidirectional), num_layers, dropout, train,
              bidirectional, nonlinearity)
    output, h_n, _ = _call("rnn", input, (hx,), weights, config, batch_sizes)
    return output, h_n


def lstm(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    weights: Sequence[Tensor],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    train: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """A whole LSTM stack, like ``rnn``: hx is (h0 [L*D, B, R], c0 [L*D, B, H]),
    weights torch.nn.LSTM's ``_flat_weights`` (with weight_hr under proj_size,
    R = proj_size, else R = H). Returns (output, (h_n, c_n))."""
    _check_cuda_built(input)
    config = (_has_biases(weights, num_layers, bidirectional), num_layers, dropout, train,
              bidirectional)
    output, h_n, c_n, _ = _call("lstm", input, hx, weights, config, batch_sizes)
    return output, (h_n, c_n)


def gru(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    train: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """A whole GRU stack, like ``rnn``, from torch.nn.GRU's ``_flat_weights``."""
    _check_cuda_built(input)
    config = (_has_biases(weights, num_layers, bidirectional), num_layers, dropout, train,
              bidirectional)
    output, h_n, _ = _call("gru", input, (hx,), weights, config, batch_sizes)
    return output, h_n


class _Args:
    """An op call's arguments by name: (input, *states, weights, *config, batch_sizes[,
    need_reserve])."""

    def __init__(self, name, args):
        states = _STATES[name]
        config = 6 if name == "rnn" else 5  # has_biases .. [nonlinearity]
        self.need_reserve = True
        if len(args) > 3 + states + config:  # a forward call's need_reserve
            *args, self.need_reserve = args
        self.input = args[0]
        self.states = list(args[1 : 1 + states])
        self.weights = args[1 + states]
        self.config = tuple(args[2 + states : -1])
        self.batch_sizes = args[-1]
        _, self.num_layers, self.dropout, self.train, self.bidirectional = self.config[:5]


# Fake kernels: output shapes for meta tensors and tracing (torch.compile,
# torch.export). The device kernels own the argument checks and their
# messages; the few checks here are the ones a shape computation needs, and
# the device check: with one meta tensor among CPU tensors the Meta key wins
# dispatch, and returning meta "results" for CPU inputs would be wrong (nor
# may batch_sizes be a meta tensor: CPU "results" of garbage).
def _weight_names(count, has_biases, num_layers, bidirectional):
    """The flat weights' names as csrc/checks.h (param_name) gives them: weight_ih_l0, ..."""
    directions = 2 if bidirectional else 1
    per_cell = max(count // max(num_layers * directions, 1), 1)
    kinds = (("weight_ih", "weight_hh", "bias_ih", "bias_hh") if has_biases
             else ("weight_ih", "weight_hh")) + ("weight_hr",)
    return [f"{kinds[i % per_cell]}_l{i // per_cell // directions}"
            f"{'_reverse' if i // per_cell % directions else ''}" for i in range(count)]


def _check_devices(op, input, named, batch_sizes):
    """named: (name, tensor) pairs. The device kernels' messages (csrc/checks.h)."""
    for name, t in named:
        if t.device != input.device:
            raise RuntimeError(f"{op}: {name} must be on the same device as input")
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError(f"{op}: batch_sizes must be a 1-D int64 CPU tensor")


def _named(a: "_Args"):
    states = zip(("hx", "cx"), a.states)
    weights = zip(_weight_names(len(a.weights), a.config[0], a.num_layers, a.bidirectional),
                  a.weights)
    return [*states, *weights]


def _reserve_widths(name, a: _Args):
    """The reserve's parts in order, each [N, width] (csrc/ops.h): their widths."""
    hx = a.states[0]
    if hx.dim() != 3:
        raise RuntimeError(f"fastrnn::{name}: hx must be 3-D [L*D, B, H], got {hx.dim()}-D")
    directions = 2 if a.bidirectional else 1
    hidden = a.states[-1].shape[2]  # cx's for LSTM
    dropped = _dropout_applied(a.num_layers, a.dropout, a.train)
    layer = {"rnn": [], "lstm": [4 * hidden, hidden], "gru": [3 * hidden, hidden]}[name]
    if name == "lstm" and hx.shape[2] != hidden:  # the projection's m
        layer.append(hidden)
    return ([_output_width(a.bidirectional, hx)] * ((a.num_layers - 1) * (2 if dropped else 1))
            + [directions * w for w in layer] * a.num_layers)


def _reserve_size(name, a: _Args):
    """csrc/checks.h RnnConfig::reserve_size."""
    widths = _reserve_widths(name, a)
    rows = a.input.shape[0] if a.input.dim() == 2 else a.input.shape[0] * a.input.shape[1]
    return rows * sum(widths)


def _reserve_dtype(input):
    """csrc/ops.h: a half-type call on the CPU runs, and keeps its reserve, in float32."""
    half = input.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if half and input.device.type == "cpu" else input.dtype


def _register_fakes(name):
    op = f"fastrnn::{name}"

    @torch.library.register_fake(op)
    def forward_fake(*args):
        a = _Args(name, args)
        _check_devices(op, a.input, _named(a), a.batch_sizes)
        reserve = a.input.new_empty(_reserve_size(name, a) if a.need_reserve else 0,
                                    dtype=_reserve_dtype(a.input))
        output = a.input.new_empty((*a.input.shape[:-1], _output_width(a.bidirectional, a.states[0])))
        return (output, *(s.new_empty(s.shape) for s in a.states), reserve)

    # After the forward's arguments: output, reserve, grad_output, the states'
    # gradients, need_input_grad, need_weight_grad.
    tail = 5 + _STATES[name]

    @torch.library.register_fake(f"{op}_backward")
    def backward_fake(*args):
        need_input_grad, need_weight_grad = args[-2:]
        a = _Args(name, args[:-tail])
        tail_names = ("output", "reserve", "grad_output", "grad_h_n", "grad_c_n")
        _check_devices(f"{op}_backward", a.input, [*_named(a), *zip(tail_names, args[-tail:-2])],
                       a.batch_sizes)
        grad_input = a.input.new_empty(a.input.shape if need_input_grad else (0,))
        grad_weights = [w.new_empty(w.shape if need_weight_grad else (0,)) for w in a.weights]
        return (grad_input, *(s.new_empty(s.shape) for s in a.states), grad_weights)


# dtype -> a CPU zero scalar; (dtype, shape) -> it broadcast to that shape: the zeros of
# eager CPU calls.
_ZERO = {}
_ZEROS = {}
_ZEROS_KEPT = 32  # shapes at most (packed batches come in many sizes)


def _zeros(shape, like: Tensor) -> Tensor:
    """Zeros of `shape` in like's dtype and device, for an op argument: a zero initial state
    (the modules' hx=None) or a gradient that did not reach an output. In an eager CPU call,
    one zero broadcast, kept per shape: the ops copy a broadcast argument into memory they
    keep (csrc/scratch.h), where torch.zeros costs an allocation, and often page faults,
    every call; and even the view is a dispatcher call, which right after the kernels of
    the call before cost 20-60 us. Graphs (compile, trace, export), torch.func transforms
    (whose ops wrap what they make: kept, it would outlive the transform) and other devices
    get torch.zeros, as torch.nn's modules make."""
    if not like.is_cpu or _recorded() or torch._C._functorch.maybe_current_level() is not None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    key = (like.dtype, tuple(shape))
    zero = _ZEROS.get(key)
    if zero is None:
        if len(_ZEROS) >= _ZEROS_KEPT:
            _ZEROS.clear()
        with torch.inference_mode(False):  # savable for backward, wherever it is first made
            scalar = _ZERO.get(like.dtype)
            if scalar is None:
                scalar = _ZERO.setdefault(like.dtype, torch.zeros((), dtype=like.dtype))
            zero = _ZEROS.setdefault(key, scalar.expand(key[1]))
    return zero


# Autograd: one backward-op call for the whole stack.
def _backward(name, config, saved, grad_output, grad_states, need_input, need_states, need_weights):
    """The backward op's call from what forward saved: (grad_input, [grad_states],
    [grad_weights]), None where not needed."""
    states = _STATES[name]
    input, *rest = saved
    state_tensors, (batch_sizes, out, reserve), weights = (
        rest[:states], rest[states : states + 3], rest[states + 3 :])
    if grad_output is None:
        grad_output = _zeros(out.shape, out)
    grad_states = [g if g is not None else _zeros(s.shape, s)
                   for g, s in zip(grad_states, state_tensors)]
    grad_mode = torch.is_grad_enabled()
    differentiable = grad_mode and torch._C._functorch.maybe_current_level() is None and not _recorded()
    if differentiable or any(_legacy_batched(g) for g in (grad_output, *grad_states)):
        # create_graph=True: gradients that can be differentiated again. Or gradients batched
        # by torch.autograd.grad's is_grads_batched (and autograd.functional's vectorize),
        # whose vmap no rule of a custom op reaches.
        return _differentiable_backward(name, config, input, state_tensors, weights, batch_sizes,
                                        reserve, grad_output, grad_states, need_input,
                                        need_states, need_weights, differentiable)
    args = (input, *state_tensors, weights, *config, batch_sizes, out, reserve, grad_output,
            *grad_states, need_input, any(need_weights))
    if grad_mode:
        # A torch.func transform's backward (which runs with grad mode on) or a traced one:
        # the results are recorded, so that differentiating them again says why it cannot.
        results = _NoDoubleBackward.apply(name, *args)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            results = getattr(_ops, f"{name}_backward")(*args)
    return (results[0] if need_input else None,
            [g if n else None for g, n in zip(results[1 : 1 + states], need_states)],
            [g if n else None for g, n in zip(results[-1], need_weights)])


# Higher-order autograd and transforms the ops have no formula for run the same math in ops
# that autograd and torch.func differentiate: double backward recomputes the forward by
# torch.nn's own CPU computation (_native_call); forward-mode AD and gradients of gradients
# inside torch.func run fastrnn/reference.py's plain PyTorch steps (slow, but correct on any
# device).


def _reference_call(name, input, states, weights, config, batch_sizes, masks=None):
    """(output, *final states) of an op call computed by fastrnn.reference. masks: the dropout
    masks to apply between layers, drawn here (as torch.nn.functional.dropout draws) if None."""
    _, num_layers, dropout, train, bidirectional = config[:5]
    if masks is None:
        masks = []
        if _dropout_applied(num_layers, dropout, train):
            ones = input.new_ones((*input.shape[:-1], _output_width(bidirectional, states[0])))
            masks = [torch.nn.functional.dropout(ones, dropout, True) for _ in range(num_layers - 1)]
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_sizes=batch_sizes,
                  dropout_masks=masks)
    if name == "rnn":
        return rnn_reference(input, states[0], weights, nonlinearity=config[5], **kwargs)
    if name == "lstm":
        output, (h_n, c_n) = lstm_reference(input, tuple(states), weights, **kwargs)
        return output, h_n, c_n
    return gru_reference(input, states[0], weights, **kwargs)


def _native_call(name, input, states, weights, config, batch_sizes, masks):
    """(output, *final states) by torch.nn's own CPU computation (aten's per-step ops, which
    autograd differentiates twice): the whole stack in one call, or layer by layer with the
    dropout masks between layers. 2.5-4x faster than fastrnn.reference's Python steps."""
    has_biases, num_layers, _, train, bidirectional = config[:5]
    if name == "rnn":
        fn = torch._VF.rnn_tanh if config[5] == "tanh" else torch._VF.rnn_relu
    else:
        fn = torch._VF.lstm if name == "lstm" else torch._VF.gru
    directions, per_layer = (2 if bidirectional else 1), len(weights) // num_layers
    spans = [(l, l + 1) for l in range(num_layers)] if masks else [(0, num_layers)]
    x, finals = input, [[] for _ in states]
    for first, last in spans:
        hx = [s[first * directions : last * directions] for s in states]
        hx = hx if name == "lstm" else hx[0]
        settings = (list(weights[first * per_layer : last * per_layer]), has_biases, last - first,
                    0.0, train, bidirectional)
        with warnings.catch_warnings():
            # (torch's note that oneDNN has no LSTM projection: about torch's own choice)
            warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
            if batch_sizes is None:
                x, *final = fn(x, hx, *settings, False)
            else:
                x, *final = fn(x, batch_sizes, hx, *settings)
        for kept, f in zip(finals, final):
            kept.append(f)
        if last < num_layers:
            x = x * masks[first]
    return (x, *(torch.cat(kept, 0) for kept in finals))


def _reserved_masks(config, input, states, reserve):
    """The dropout masks a forward call drew, from its reserve (csrc/ops.h: the outputs of
    layers 0..L-2, then their masks, each [N, D*H])."""
    _, num_layers, dropout, train, bidirectional = config[:5]
    if not _dropout_applied(num_layers, dropout, train):
        return []
    width = _output_width(bidirectional, states[0])
    shape = (*input.shape[:-1], width)
    size = input[..., 0].numel() * width
    start = (num_layers - 1) * size
    return [reserve[start + l * size : start + (l + 1) * size].view(shape).to(input.dtype)
            for l in range(num_layers - 1)]


def _legacy_batched(t):
    """Whether t is batched by torch.autograd.grad's is_grads_batched (torch's older vmap)."""
    return t is not None and torch._C._functorch.is_legacy_batchedtensor(t)


def _differentiable_backward(name, config, input, states, weights, batch_sizes, reserve,
                             grad_output, grad_states, need_input, need_states, need_weights,
                             create_graph):
    """_backward's results by autograd: the forward recomputed from what the op call saved,
    with the call's own dropout masks, and differentiated (create_graph: so that the gradients
    can be differentiated again). On the CPU by torch.nn's own computation; elsewhere by
    fastrnn.reference (cuDNN's RNN backward is not differentiable)."""
    tensors = (input, *states, *weights)
    needs = (need_input, *need_states, *need_weights)
    wanted = [t for t, need in zip(tensors, needs) if need]
    recompute = _native_call if input.is_cpu else _reference_call
    with torch.enable_grad():
        outputs = recompute(name, input, states, weights, config, batch_sizes,
                            _reserved_masks(config, input, states, reserve))
    grads = iter(torch.autograd.grad(outputs, wanted, (grad_output, *grad_states),
                                     create_graph=create_graph, materialize_grads=True)
                 if wanted else ())
    results = [next(grads) if need else None for need in needs]
    count = len(states)
    return results[0], results[1 : 1 + count], results[1 + count :]


def _save(ctx, name, config, input, states, batch_sizes, weights, output):
    ctx.name, ctx.config = name, config
    ctx.save_for_backward(input, *states, batch_sizes, output[0], output[-1], *weights)
    ctx.mark_non_differentiable(output[-1])  # the reserve
    # Outputs without a gradient reach backward as None, not as zeros: the reserve never
    # has one, and zeros the size of a whole stack's saved tensors cost a memset per
    # backward (an LSTM's is several times its output). _backward makes the zeros that it
    # does need.
    ctx.set_materialize_grads(False)


def _register_autograd(name):
    states = _STATES[name]

    def setup_context(ctx, inputs, output):
        a = _Args(name, inputs)
        _save(ctx, name, a.config, a.input, a.states, a.batch_sizes, a.weights, output)

    def backward(ctx, grad_output, *grads):
        need = ctx.needs_input_grad
        grad_input, grad_states, grad_weights = _backward(
            name, ctx.config, ctx.saved_tensors, grad_output, grads[:states], need[0],
            need[1 : 1 + states], need[1 + states])
        # One gradient per argument passed (need_reserve, defaulted, may not have been).
        return (grad_input, *grad_states, grad_weights, *([None] * (len(need) - 2 - states)))

    def no_double_backward(ctx, *grads):
        raise _double_backward_error(name)

    torch.library.register_autograd(f"fastrnn::{name}", backward, setup_context=setup_context)
    torch.library.register_autograd(f"fastrnn::{name}_backward", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _double_backward_error(name):
    return RuntimeError(
        f"fastrnn: double backward of a backward that ran inside a torch.func transform or a "
        f"compiled graph is not supported by fastrnn's {name} op; differentiate twice either "
        "inside torch.func (nested transforms) or with torch.autograd outside it "
        "(create_graph=True)")


class _NoDoubleBackward(torch.autograd.Function):
    """The backward op, called where its results are recorded: an autograd.Function with
    setup_context (as torch.func's transforms require; register_autograd's is not one),
    whose own backward raises. Under vmap (torch.func.jacrev's vmap over a backward) the op's
    batching rule batches it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(_ops, f"{name}_backward")(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise _double_backward_error(ctx.name)


def _run(name, config, batch_sizes, input, tensors, need_reserve=True):
    """The op on flat arguments (states, then weights), below autograd: where _Eager records
    the call, or nothing is recorded (inference). The op's own autograd kernel would only
    cost time here (in inference it finds grad mode off and redispatches: 20 us, a fifth
    of a tiny module call), and is no torch.func transform's."""
    states = _STATES[name]
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(_ops, name)(input, *tensors[:states], list(tensors[states:]), *config,
                                   batch_sizes, need_reserve)


def _setup(ctx, name, config, batch_sizes, input, tensors, output):
    states = _STATES[name]
    _save(ctx, name, config, input, tensors[:states], batch_sizes, tensors[states:], output)


class _Eager(torch.autograd.Function):
    """An eager op call that needs gradients: the same op, the same backward (_backward)
    as register_autograd's, from a plain autograd.Function over a flat tuple of tensors.
    register_autograd takes the weights as a list and flattens it with pytrees on every
    call and backward, which cost more than a small stack's whole forward and backward
    (a 2-layer bidirectional stack at T = 1: 264 us against 169 us). Tracing, compiling
    and exporting call the op itself, which they know through its registrations.

    forward takes ctx: Function.apply then binds no signature for a setup_context (about
    10 us a call). torch.func's transforms need the other form: _EagerTransformed."""

    @staticmethod
    def forward(ctx, name, config, batch_sizes, input, *tensors):
        output = _run(name, config, batch_sizes, input, tensors)
        _setup(ctx, name, config, batch_sizes, input, tensors, output)
        return output

    @staticmethod
    def backward(ctx, grad_output, *grads):
        states = _STATES[ctx.name]
        need = ctx.needs_input_grad  # (name, config, batch_sizes, input, *states, *weights)
        grad_input, grad_states, grad_weights = _backward(
            ctx.name, ctx.config, ctx.saved_tensors, grad_output, grads[:states], need[3],
            need[4 : 4 + states], need[4 + states :])
        return (None, None, None, grad_input, *grad_states, *grad_weights)


class _EagerTransformed(_Eager):
    """_Eager under torch.func transforms, which take a forward without ctx and a
    setup_context. Under vmap, forward and backward run batched: the ops' batching rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name, config, batch_sizes, input, *tensors):
        return _run(name, config, batch_sizes, input, tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        name, config, batch_sizes, input, *tensors = inputs
        _setup(ctx, name, config, batch_sizes, input, tensors, output)


# Function.apply binds its arguments to forward's signature on every call (for
# setup_context); inspect.signature would rebuild that signature each time, a
# tenth of a tiny stack's forward. It is fixed: build it once.
_EagerTransformed.forward.__signature__ = inspect.signature(_EagerTransformed.forward)


def _call(name, input, states, weights, config, batch_sizes):
    """One op call: (output, *final states, reserve)."""
    level = torch._C._functorch.maybe_current_level()
    if (level is not None and not _fused_transforms()) or (
            _forward_ad._current_level >= 0 and any(
                _forward_ad.unpack_dual(t).tangent is not None for t in (input, *states, *weights))):
        # Forward-mode AD (torch.func.jvp, dual tensors) and gradients of gradients inside
        # torch.func (grad of grad, hessian): the ops have no formula for them.
        return (*_reference_call(name, input, states, weights, config, batch_sizes), None)
    recorded = _recorded()
    device_type = "cpu" if input.is_cpu else input.device.type  # (is_cpu makes no device object)
    if not recorded and _autocast_on(device_type):
        # Eager under autocast: the casts of the op's autocast kernel, here, where autograd
        # records them, then the call as without autocast (_Eager where gradients follow).
        # Through the op's own autocast kernel a call needing gradients went on through
        # register_autograd's kernel (below): a small LSTM's forward+backward took 140 us
        # more, a third of it.
        dtype = _autocast_dtype(device_type)
        input, states, weights = (_autocast_cast(v, dtype, device_type) for v in (input, states, weights))
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return _call_op(name, input, states, weights, config, batch_sizes, level, recorded)
    return _call_op(name, input, states, weights, config, batch_sizes, level, recorded)


def _call_op(name, input, states, weights, config, batch_sizes, level, recorded):
    tracked = _tracked if level is not None else (lambda t: t.requires_grad)
    need_grad = torch.is_grad_enabled() and any(tracked(t) for t in (input, *states, *weights))
    if need_grad and not recorded:
        function = _Eager if level is None else _EagerTransformed
        return function.apply(name, config, batch_sizes, input, *states, *weights)
    # Without a gradient to come (inference) the op keeps no reserve. A trace
    # (torch.jit.trace) keeps it: the traced graph may run where one is needed.
    need_reserve = need_grad or torch.jit.is_tracing()
    if recorded or level is not None:
        return getattr(_ops, name)(input, *states, list(weights), *config, batch_sizes,
                                   need_reserve)
    return _run(name, config, batch_sizes, input, (*states, *weights), need_reserve)


def _tracked(t):
    """Whether autograd tracks t, under vmap too: a tensor batched by vmap says
    requires_grad=False whatever it wraps."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.requires_grad


def _fused_transforms():
    """Whether the ops run under the torch.func transforms the call is under: any number of
    vmaps (the forward and backward ops' batching rules) and at most one grad or vjp (their
    autograd), but no jvp, and no grad of a grad (a backward differentiated again)."""
    kinds = [i.key() for i in torch._C._functorch.get_interpreter_stack() or ()]
    return (torch._C._functorch.TransformType.Jvp not in kinds
            and kinds.count(torch._C._functorch.TransformType.Grad) <= 1)


def _recorded():
    """Whether the call is being recorded into a graph rather than run."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.compiler.is_exporting()


# Autocast. torch.nn's recurrent modules under torch.autocast run in the
# autocast dtype on the CPU (their GEMMs are autocast ops), and in float16 on
# CUDA whatever the autocast dtype (cuDNN's RNN op casts to float16 itself,
# aten/src/ATen/cudnn/AutocastRNN.cpp); their outputs come out so. A custom op is
# not cast by default, and torch.library.register_autocast casts to one dtype
# fixed at registration: this kernel reads the current autocast dtype at call
# time, casts the floating-point tensors of the autocast device (float64
# excepted, as autocast does) and runs the op with autocast off. The casts are
# recorded by autograd, so float32 parameters get float32 gradients.
_autocast_lib = torch.library.Library("fastrnn", "IMPL")


_AUTOCAST_DEVICES = ("cpu", "cuda")  # the devices the ops have autocast kernels for
_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))


def _autocast_on(device_type):
    """Whether autocast applies to the ops on this device (torch raises for a device it has
    no autocast for, e.g. meta)."""
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def _autocast_dtype(device_type):
    if device_type == "cuda" and torch.backends.cudnn.enabled:
        return torch.float16
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(value, dtype, device_type):
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, dtype, device_type) for v in value)
    if (isinstance(value, Tensor) and value.is_floating_point()
            and value.device.type == device_type and value.dtype != torch.float64):
        return value.to(dtype)
    return value


def _autocast_kernel(op, device_type):
    def kernel(*args):
        dtype = _autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return op(*(_autocast_cast(a, dtype, device_type) for a in args))

    return kernel


def _by_slices(op, batch_size, in_dims, args, before_slice=lambda: None):
    """op batched by one call per slice of the batched arguments, the results stacked:
    (results, out_dims) as a batching rule returns them."""

    def pick(arg, dim, i):
        if isinstance(arg, (list, tuple)):
            dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(arg)
            return [pick(a, d, i) for a, d in zip(arg, dims)]
        return arg if dim is None else arg.select(dim, i)

    slices = []
    for i in range(batch_size):
        before_slice()
        slices.append(op(*(pick(a, d, i) for a, d in zip(args, in_dims))))
    stacked = tuple([torch.stack(list(parts)) for parts in zip(*field)]
                    if isinstance(field[0], (list, tuple)) else torch.stack(field)
                    for field in zip(*slices))
    out_dims = tuple([0] * len(part) if isinstance(part, (list, tuple)) else 0
                     for part in slices[0])
    return stacked, out_dims


def _vmap_backward(op):
    """The backward ops' batching rule. A backward is batched over its incoming gradients
    (a Jacobian's rows: torch.func.jacrev; vmap of grad) and over what the forward saved;
    each slice's weight gradients are its own sums over every row, so the slices cannot
    share one call."""
    return lambda info, in_dims, *args: _by_slices(op, info.batch_size, in_dims, args)


def _vmap_forward(name):
    """The forward ops' batching rule. Where only the input and the initial states are
    batched (vmap over inputs; per-sample gradients) and no dropout is drawn, the vmapped
    dimension joins the batch: one call for every slice, its reserve regrouped by slice for
    the backward's rule, which runs per slice. Otherwise (batched weights: a model ensemble
    of torch.func.stack_module_state) one call per slice. Dropout follows vmap's randomness:
    "error" raises as torch's random ops do, "different" draws each slice's masks in turn,
    "same" one set for all."""
    op = getattr(_ops, name).default
    states = _STATES[name]

    def rule(info, in_dims, *args):
        a = _Args(name, args)
        input_dim, state_dims = in_dims[0], in_dims[1 : 1 + states]
        weight_dims = in_dims[1 + states]
        weights_batched = weight_dims is not None and any(d is not None for d in weight_dims)
        dropped = _dropout_applied(a.num_layers, a.dropout, a.train)
        if dropped and info.randomness == "error":
            raise RuntimeError(
                "vmap: called random operation while in randomness error mode. Please either "
                "use the 'same' or 'different' randomness flags on vmap or perform the "
                "randomness operation out of vmap")
        if (weights_batched or dropped or a.batch_sizes is not None
                or a.input.dim() - (input_dim is not None) != 3):
            before_slice = lambda: None
            if dropped and info.randomness == "same":
                before_slice = _replaying_generator(a.input.device)
            return _by_slices(op, info.batch_size, in_dims, args, before_slice)
        size = info.batch_size

        def joined(t, dim):  # [X, B, F] per slice -> [X, size * B, F]
            t = t.movedim(dim, 1) if dim is not None else t.unsqueeze(1).expand(
                t.shape[0], size, *t.shape[1:])
            return t.reshape(t.shape[0], -1, t.shape[-1])

        input = joined(a.input, input_dim)
        *batched, reserve = op(input, *map(joined, a.states, state_dims), a.weights, *a.config,
                               None, a.need_reserve)
        batched = [t.view(t.shape[0], size, -1, t.shape[-1]) for t in batched]
        if not a.need_reserve:
            return (*batched, reserve), (1,) * len(batched) + (None,)
        # Each part [T * size*B, width] -> [size, T*B*width], the parts side by side.
        steps, rows = input.shape[0], input.shape[0] * input.shape[1]
        widths = _reserve_widths(name, a)
        parts = reserve.split([rows * w for w in widths])
        reserve = torch.cat([reserve.new_empty(size, 0)]
                            + [part.view(steps, size, -1, w).movedim(1, 0).reshape(size, -1)
                               for part, w in zip(parts, widths)], 1)
        return (*batched, reserve), (1,) * len(batched) + (0,)

    return rule


def _replaying_generator(device):
    """A callable that puts device's default generator back where it was at the first call,
    on every call: each slice draws the same numbers."""
    cuda = device.type == "cuda"
    get = (lambda: torch.cuda.get_rng_state(device)) if cuda else torch.get_rng_state
    put = (lambda s: torch.cuda.set_rng_state(s, device)) if cuda else torch.set_rng_state
    start = []

    def replay():
        if start:
            put(start[0])
        else:
            start.append(get())

    return replay


def _register_autocast(name):
    op = getattr(_ops, name).default
    for device_type in _AUTOCAST_DEVICES:
        _autocast_lib.impl(name, _autocast_kernel(op, device_type), f"Autocast{device_type.upper()}")


for _name in _STATES:
    _register_fakes(_name)
    _register_autograd(_name)
    _register_autocast(_name)
    torch.library.register_vmap(f"fastrnn::{_name}", _vmap_forward(_name))
    torch.library.register_vmap(f"fastrnn::{_name}_backward",
                                _vmap_backward(getattr(_ops, f"{_name}_backward").default))
