"""``LearnedOptimizer(compile=True)``: the rule's step through torch.compile (lopt_hf.kernels.compiled).

The compiled step is the rule's own code (Celo and VeLO write their small per-element network out unit by
unit when compiled), so it must train like the eager kernel up to float rounding, keep the same state (a
checkpoint moves between the two), and fall back to the eager kernel — with a warning, never a failed
step — when Inductor cannot build it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lopt_hf import LearnedOptimizer, load_lopt
from lopt_hf.bench import COMPILED, compiled_names, make_optimizer
from lopt_hf.kernels import kernel_for
from lopt_hf.kernels import in_place
from lopt_hf.kernels.celo2 import is_column_major
from lopt_hf.kernels.compiled import CompiledKernel, Compiler, compile_options, compiles, takes_compiled_path
from lopt_hf.rules import available_rules, build_rule
from lopt_hf.rules.features import CONTRACTED_SKINNY_COMPILE_OPTIONS, compiled_skinny_product, feature_mean_squares
from lopt_hf.rules.small_fc_lopt import advance_moments

CPU = torch.device("cpu")


def train(rule_name: str, compile: bool, model_fn, steps: int = 3, lr: float = 1.0,
          **rule_options) -> tuple[nn.Module, LearnedOptimizer]:
    rule = build_rule(rule_name, **rule_options)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    model = model_fn()
    optimizer = LearnedOptimizer(model.parameters(), rule, theta, lr=lr, compile=compile)
    optimizer.set_total_steps(20)
    data = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(data).square().mean()
        loss.backward()
        optimizer.step(loss=loss.detach())
    return model, optimizer


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 4)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def assert_trains_alike(rule_name: str, model_fn, lr: float = 1.0, **rule_options) -> None:
    eager_model, eager = train(rule_name, False, model_fn, lr=lr, **rule_options)
    compiled_model, compiled = train(rule_name, True, model_fn, lr=lr, **rule_options)
    kernel = compiled.kernel_on(CPU)
    assert isinstance(kernel, CompiledKernel) == compiles(compiled.rule)  # else the kernel compiles parts
    assert kernel.compiler is not None and not kernel.compiler.failed
    for expected, actual in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
    # the same state, key for key: a checkpoint of one loads into the other
    for eager_state, compiled_state in zip(eager.state_dict()["state"].values(),
                                           compiled.state_dict()["state"].values()):
        assert eager_state.keys() == compiled_state.keys()
        for key, value in eager_state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(compiled_state[key], value, rtol=1e-5, atol=1e-7)
            else:
                assert compiled_state[key] == value
    assert compiled.num_skipped_nonfinite == 0


def test_compiled_celo_trains_like_the_eager_kernel() -> None:
    assert_trains_alike("celo", linear)


def test_compiled_celo2_trains_like_the_eager_kernel() -> None:
    """Celo2-base on an ``nn.Linear``: the weight reaches the rule as a transposed view (its state column-major),
    the bias is a 1-D tensor (every feature element-wise); the network is written out unit by unit."""
    assert_trains_alike("celo2", linear)


def test_compiled_celo2_keeps_row_major_state() -> None:
    """Celo2's eager kernel keeps an ``nn.Linear`` weight's state column-major (the transposed view's memory
    order); the compiled kernel keeps it row-major like the parameter and gradient it hands the graph (a mix of
    orders made Inductor's loops transpose tiles: 2.7× slower than eager on the bench MLP)."""
    rule = build_rule("celo2")
    kernel = CompiledKernel(kernel_for(rule, rule.init_theta(torch.Generator().manual_seed(0))))
    weight = torch.randn(4, 8).mT  # an nn.Linear weight in JAX layout: a transposed view
    assert is_column_major(kernel.eager.init_state(weight)["momentum"])
    state = kernel.init_state(weight)
    assert all(value.is_contiguous() for value in state.values())
    assert state.keys() == kernel.eager.init_state(weight).keys()


@pytest.mark.parametrize("shape, column_major, orthogonalize", [((2, 12, 20), False, False), ((1, 20, 12), True, False),
                                                               ((3, 7), False, False), ((2, 12, 20), False, True),
                                                               ((1, 3, 3, 4, 8), False, False),  # HWIO conv kernel
                                                               ((1, 5, 4, 2, 3), False, False)])  # every group full
def test_compiled_celo2_is_another_execution_of_the_same_math(shape: tuple[int, ...], column_major: bool,
                                                              orthogonalize: bool) -> None:
    """The compiled Celo2 step (features, unrolled network and readout fused) agrees with the eager kernel's
    pieces of BLAS products to float rounding and is not them bit for bit — so it did run compiled: a stack of
    matrices, a matrix whose state lies column-major, a stack of vectors, Celo2 proper (its Newton–Schulz iteration
    amplifies the network's rounding differences about five-fold; steps of unit RMS), a conv kernel normalised per
    spatial slab, one whose largest axes are not the last two (its row/column statistics built element-wise)."""
    rule = build_rule("celo2", orthogonalize=orthogonalize)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    param, grad = torch.randn(shape, generator=gen), 1e-2 * torch.randn(shape, generator=gen)
    if column_major:
        param, grad = param.mT.contiguous().mT, grad.mT.contiguous().mT
    eager = kernel_for(rule, theta)
    states = [eager.init_state(param[index]) for index in range(shape[0])]
    for state in states:
        for key, value in state.items():
            value.copy_(torch.rand(value.shape, generator=gen) * 1e-3)
    copies = [{key: value.clone() for key, value in state.items()} for state in states]
    expected, expected_states = eager.update_stack(param, grad, copies, 3)
    actual, actual_states = CompiledKernel(kernel_for(rule, theta)).update_stack(param, grad, states, 3)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5 if orthogonalize else 2e-6)
    assert not torch.equal(actual, expected)
    for expected_state, actual_state in zip(expected_states, actual_states):
        for key, value in expected_state.items():  # (momenta near 0 after cancellation: an absolute bound too)
            torch.testing.assert_close(actual_state[key], value, rtol=1e-6, atol=1e-9)


def test_compiled_small_fc_lopt_trains_like_the_eager_kernel() -> None:
    """small_fc_lopt's network stays eager; its first pass (state advanced, features' mean squares) compiles."""
    assert_trains_alike("small_fc_lopt", linear)


def test_compiled_mlp_lopt_trains_like_the_eager_kernel() -> None:
    """mlp_lopt's first pass compiles, and so does its network piece by piece (5 features: a skinny first layer)."""
    assert_trains_alike("mlp_lopt", mlp)


def test_mlp_lopts_compiled_pieces_are_the_streamed_network() -> None:
    """Piece by piece (chunks of 128 elements, a last short piece: two graphs per shape), the compiled network
    gives the eager streamed one's step up to rounding; one graph per piece shape, none more on the next step."""
    rule = build_rule("mlp_lopt")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(4)
    kernel = kernel_for(rule, theta)
    kernel.compile_parts(Compiler(rule))
    param, grad = torch.randn(1, 30, 10, generator=gen), 1e-2 * torch.randn(1, 30, 10, generator=gen)
    state = {key: 1e-3 * torch.randn(value.shape, generator=gen) for key, value in rule.init_state(param[0]).items()}
    for step in (3, 4):
        compiled_step, _ = kernel.update_stack(param, grad, [{key: value.clone() for key, value in state.items()}],
                                               step, chunk_size=128)
        streamed, _ = kernel_for(rule, theta).update_stack(param, grad, [dict(state)], step, chunk_size=128)
        assert not kernel.compiler.failed
        torch.testing.assert_close(compiled_step, streamed, rtol=1e-5, atol=1e-9)
        assert not torch.equal(compiled_step, streamed)  # it ran compiled: another order of the sums
        assert [len(graphs) for graphs in kernel._compiled_pieces._networks.values()] == [2]


def test_small_fc_lopts_compiled_first_pass_is_the_streamed_one() -> None:
    """The compiled first pass over the whole tensor advances the state as the eager pieces do and gives the
    features' mean squares up to rounding (another order of the sums: it ran compiled); a 2-D tensor and a
    1-D one (factored and full second moments)."""
    rule = build_rule("small_fc_lopt")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(4)
    kernel = kernel_for(rule, theta)
    kernel.compile_parts(Compiler(rule))
    for shape in ((48, 40), (37,)):
        param, grad = torch.randn(shape, generator=gen), 1e-2 * torch.randn(shape, generator=gen)
        state = {key: torch.rand(value.shape, generator=gen) * 1e-3 for key, value in rule.init_state(param).items()}
        mom_decay, rms_decay, fac_decay = rule.decays(theta, param)
        _, fac = rule.factored_moments(fac_decay, grad, state)
        eager_m, eager_rms = advance_moments(mom_decay, rms_decay, state["momentum"], state["rms"], grad)
        expected = feature_mean_squares(rule.features(param, grad, eager_m, eager_rms, fac), param.numel())
        momentum, rms = state["momentum"].clone(), state["rms"].clone()
        # run eagerly (a failed compilation, dynamo's recompile limit) it does nothing: the caller streams
        assert kernel.first_pass_if_compiled(param, grad, momentum, rms, fac, mom_decay, rms_decay) is None
        assert torch.equal(momentum, state["momentum"]) and torch.equal(rms, state["rms"])
        actual = kernel._compiled_first_pass(param, grad, momentum, rms, fac, mom_decay, rms_decay)
        assert not kernel.compiler.failed
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
        assert not torch.equal(actual, expected)
        torch.testing.assert_close(momentum, eager_m, rtol=1e-6, atol=0)
        torch.testing.assert_close(rms, eager_rms, rtol=1e-6, atol=0)
        # the eager streamed pass (chunks of 128 elements) agrees: the first pass is that pass at once
        # the whole step: the compiled kernel's (first pass at once) and the eager kernel's (streamed, chunks of
        # 128 elements) agree; each advances the state it gets
        compiled_step, _ = kernel.update_stack(param.unsqueeze(0), grad.unsqueeze(0),
                                               [{key: value.clone() for key, value in state.items()}], 3,
                                               chunk_size=128)
        streamed, _ = kernel_for(rule, theta).update_stack(param.unsqueeze(0), grad.unsqueeze(0), [state], 3,
                                                           chunk_size=128)
        torch.testing.assert_close(compiled_step, streamed, rtol=1e-5, atol=1e-9)


def test_large_tensors_keep_the_streamed_first_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """From IN_PLACE_MIN_NUMEL elements on the first pass stays streamed (its memory near AdamW's is what the
    memory benchmark measures at such sizes)."""
    rule = build_rule("small_fc_lopt")
    kernel = kernel_for(rule, rule.init_theta(torch.Generator().manual_seed(0)))
    kernel.compile_parts(Compiler(rule))
    calls = []
    kernel._compiled_first_pass = lambda *args: calls.append(args) or kernel.first_pass(*args)
    param = torch.randn(1, 20, 10)
    kernel.update_stack(param, 1e-2 * param, [rule.init_state(param[0])], 0)
    assert len(calls) == 1
    monkeypatch.setattr(in_place, "IN_PLACE_MIN_NUMEL", 200)
    kernel.update_stack(param, 1e-2 * param, [rule.init_state(param[0])], 0)
    assert len(calls) == 1


def test_the_compiled_step_is_another_execution_of_the_same_math() -> None:
    """On a 64×64 tensor the compiled Celo step (unrolled network, fused reductions) differs from the eager
    kernel's in the last bits — so it did run compiled — and agrees to float rounding."""
    rule = build_rule("celo")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    param, grad = torch.randn(1, 64, 64, generator=gen), 1e-2 * torch.randn(1, 64, 64, generator=gen)
    state = {key: torch.rand(value.shape, generator=gen) * 1e-3 if key in ("momentum", "rms") else value
             for key, value in rule.init_state(param[0]).items()}
    control = torch.tensor([[1.0, 1.0]])
    eager = kernel_for(rule, theta)  # in place: it advances the state it gets
    expected, expected_state = eager.update_stack(param, grad, [{key: value.clone() for key, value in state.items()}],
                                                  4, control=control)
    compiled = CompiledKernel(kernel_for(rule, theta))
    actual, actual_state = compiled.update_stack(param, grad, [state], 4, control=control)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-9)
    assert not torch.equal(actual, expected)
    for key, value in expected_state[0].items():
        torch.testing.assert_close(actual_state[0][key], value, rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("rule_name, options", [("celo", {}), ("velo", {"lstm_hidden_size": 16, "param_inits": 4}),
                                                ("celo_adam", {"orthogonalize": True, "tensor_features": True}),
                                                ("opt2vec", {}), ("per_param_mlp", {}),
                                                # Celo2's steps have unit RMS: at lr 1 three steps amplify
                                                # rounding beyond the bound; 1e-3 is its usual lr
                                                ("celo2", {"lr": 1e-3})])
def test_compiled_rules_train_like_the_eager_kernels_on_an_mlp(rule_name: str, options: dict) -> None:
    assert_trains_alike(rule_name, mlp, **options)


def test_compiled_checkpoint_resumes_in_an_eager_optimizer() -> None:
    """A run stepped compiled and resumed eagerly (or on a machine without a compiler) goes on from the
    same state: its next step equals the compiled run's next step up to rounding."""
    model, compiled = train("celo", True, linear, steps=2)
    resumed_model = linear()
    resumed_model.load_state_dict(model.state_dict())
    rule = build_rule("celo")
    resumed = LearnedOptimizer(resumed_model.parameters(), rule, rule.init_theta(torch.Generator().manual_seed(0)))
    resumed.load_state_dict(compiled.state_dict())
    data = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for net, optimizer in ((model, compiled), (resumed_model, resumed)):
        optimizer.zero_grad()
        loss = net(data).square().mean()
        loss.backward()
        optimizer.step(loss=loss.detach())
    for expected, actual in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


FALLBACK_SCRIPT = """
import sys, warnings
sys.path.insert(0, sys.argv[1])
from test_compiled_kernel import CPU, linear, train
import torch
# a whole compiled step; compiled parts (the streamed first pass instead; and mlp_lopt's network by pieces)
for rule in ("celo", "small_fc_lopt", "mlp_lopt", "per_param_mlp"):
    eager_model, _ = train(rule, False, linear)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_model, compiled = train(rule, True, linear)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and f"compiling the {rule!r} step failed" in messages[0], messages
    assert compiled.kernel_on(CPU).compiler.failed
    assert all(torch.equal(a, b) for a, b in zip(eager_model.parameters(), compiled_model.parameters()))
print("fell back")
"""


def test_a_failed_compilation_warns_and_steps_eagerly(tmp_path: Path) -> None:
    """No C++ compiler for Inductor (``CXX`` names one that does not exist; a fresh process and an empty cache,
    since Inductor remembers the compiler it found for the life of a process): one RuntimeWarning, then the
    eager kernel's exact results — for Celo (its whole step compiles), small_fc_lopt (its first pass: the
    streamed one instead), mlp_lopt (its first pass and its network's pieces: the eager ones instead) and
    per_param_mlp (its whole step, compiled without Dynamo)."""
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "fell back" in done.stdout, done.stderr[-3000:]


def test_compile_applies_to_the_rules_it_speeds_up() -> None:
    """Small, skinny or no per-element networks compile; wide ones (BLAS-bound) keep their eager kernels."""
    assert [name for name in available_rules() if compiles(build_rule(name))] == [
        "celo", "celo2", "celo_adam", "opt2vec", "per_param_mlp", "velo"]
    assert not compiles(build_rule("per_param_mlp", hidden_sizes=[64, 64]))  # a 65×65 product is no skinny one
    model = linear()
    optimizer = load_lopt("lopt-hf/celo-adam-ns", model, compile=True)
    assert isinstance(optimizer.kernel_on(CPU), CompiledKernel)
    optimizer.compile = False  # switched off (e.g. to compare): the eager kernel from the next step on
    assert not isinstance(optimizer.kernel_on(CPU), CompiledKernel)
    assert not isinstance(load_lopt("lopt-hf/celo-adam-ns", model).kernel_on(CPU), CompiledKernel)
    small_fc = load_lopt("lopt-hf/small-fc-lolo", model, compile=True).kernel_on(CPU)
    assert not isinstance(small_fc, CompiledKernel) and small_fc.compiler is not None  # its first pass compiles
    assert [name for name in available_rules() if takes_compiled_path(build_rule(name))] == [
        "celo", "celo2", "celo_adam", "mlp_lopt", "opt2vec", "per_param_mlp", "small_fc_lopt", "velo"]


def test_bench_times_the_compiled_rules_as_rows_of_their_own() -> None:
    assert compiled_names(["adamw", "celo", "small_fc_lopt", "celo2", "celo2-base"]) == [
        name + COMPILED for name in ("celo", "small_fc_lopt", "celo2", "celo2-base")]
    assert make_optimizer("celo" + COMPILED, mlp()).compile
    assert not make_optimizer("celo", mlp()).compile


def test_the_compiled_graph_gets_contiguous_tensors() -> None:
    """Celo computes in JAX layout, so an ``nn.Linear`` weight and its gradient reach the kernel as transposed
    views; the compiled graph gets contiguous copies (one memory order for all its inputs: Inductor's loops
    over a mix transpose tiles, 1.3× slower for Celo on the benchmark MLP)."""
    rule = build_rule("celo")
    model = linear()
    optimizer = LearnedOptimizer(model.parameters(), rule, rule.init_theta(torch.Generator().manual_seed(0)),
                                 compile=True)
    optimizer.set_total_steps(20)
    kernel = optimizer.kernel_on(CPU)
    seen, one = [], kernel._one

    def recording(theta, param, grad, *args):
        seen.append((param.is_contiguous(), grad.is_contiguous()))
        return one(theta, param, grad, *args)

    kernel._one = recording
    loss = model(torch.randn(16, 8)).square().mean()
    loss.backward()
    assert optimizer.layout_of(model.weight) == "linear"  # handed to the kernel as a transposed view
    optimizer.step(loss=loss.detach())
    assert seen == [(True, True), (True, True)] and not kernel.compiler.failed


def test_the_compiled_per_param_mlp_writes_its_skinny_products_out() -> None:
    """per_param_mlp's 3→64→2 products, compiled, are broadcast products (rules/features.py::skinny_matmul):
    another order of the sums than the eager kernel's BLAS products — so it ran compiled — and the same step
    up to rounding; outside torch.compile the rule's products are left as they are."""
    rule = build_rule("per_param_mlp")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(3)
    param, grad = torch.randn(1, 40, 30, generator=gen), 1e-2 * torch.randn(1, 40, 30, generator=gen)
    state = {"momentum": 1e-2 * torch.randn(40, 30, generator=gen)}
    eager = kernel_for(rule, theta)
    expected, expected_state = eager.update_stack(param, grad, [{"momentum": state["momentum"].clone()}], 2)
    compiled = CompiledKernel(kernel_for(rule, theta))
    actual, actual_state = compiled.update_stack(param, grad, [state], 2)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-9)
    assert not torch.equal(actual, expected)
    torch.testing.assert_close(actual_state[0]["momentum"], expected_state[0]["momentum"], rtol=1e-6, atol=0)
    assert compiled_skinny_product(torch.ones(5, 3), torch.ones(3, 2)) is None  # eager: the caller's product
    # compiled by Inductor without Dynamo (InductorGraphs): one graph, also for the next step's state
    compiled.update_stack(param, grad, actual_state, 3)
    assert len(compiled._one) == 1 and not compiled.compiler.failed


def test_only_skinny_networks_compile_with_contracted_multiply_adds() -> None:
    """per_param_mlp's written-out network is bound by the add and multiply pipes: contracted; Celo's unrolled
    network and Celo2's statistics keep their options (unmeasured / measured otherwise)."""
    assert compile_options(build_rule("per_param_mlp"))["options"] == CONTRACTED_SKINNY_COMPILE_OPTIONS
    assert compile_options(build_rule("celo")) == Compiler.OPTIONS
    assert "options" not in compile_options(build_rule("celo2"))
