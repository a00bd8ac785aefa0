import pytest
import torch

from pah_edge.workstation.config import auto_prototype_size
from pah_edge.errors import ConfigError
from pah_edge.generators import GENERATOR_KINDS
from pah_edge.workstation.hypernetwork import FACTORIES, create_generator

D = 24


def _make(kind, num_classes=3, size=6, hidden=16):
    torch.manual_seed(0)
    return create_generator(kind, feature_dim=D, channels=1, size=size, hidden_dim=hidden, num_classes=num_classes)


@pytest.mark.parametrize("kind", ["classwise-linear", "classwise"])
@pytest.mark.parametrize("num_classes", [2, 3, 12])
def test_classwise_generates_a_head_for_any_class_count(kind, num_classes):
    gen = _make(kind)
    head = gen(torch.randn(gen.param_shape(num_classes)))
    assert head.shape == (num_classes, D)


@pytest.mark.parametrize("kind", ["classwise-linear", "classwise"])
def test_classwise_rows_depend_only_on_their_own_prototype(kind):
    gen = _make(kind)
    protos = torch.randn(gen.param_shape(4))
    changed = protos.clone()
    changed[2] += 1.0
    diff = (gen(protos) - gen(changed)).abs().sum(1)
    assert diff[2] > 0 and torch.all(diff[[0, 1, 3]] == 0)


def test_task_mlp_refuses_another_class_count():
    gen = _make("task-mlp", num_classes=3)
    assert gen(torch.randn(gen.param_shape(3))).shape == (3, D)
    with pytest.raises(ConfigError, match="classwise"):
        gen.param_shape(5)


def test_mean_init_pools_class_means_to_prototype_shape():
    gen = _make("classwise", size=4)
    means = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    protos = gen.init_params(means, random=False, generator=torch.Generator().manual_seed(0))
    assert protos.shape == (2, 1, 4, 4)
    expected = means.mean(1, keepdim=True)[:, :, :2, :2].mean((2, 3))
    assert torch.allclose(protos[:, :, 0, 0], expected)


def _fit_heads(gen, target, steps=600):
    """Optimise prototypes only, through the frozen generator, towards target heads."""
    for p in gen.parameters():
        p.requires_grad_(False)
    protos = torch.zeros(gen.param_shape(len(target)), requires_grad=True)
    opt = torch.optim.Adam([protos], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((gen(protos) - target) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item() / (target**2).mean().item()


@pytest.mark.parametrize("kind", ["classwise-linear", "classwise"])
def test_frozen_classwise_generator_reaches_unseen_heads_that_task_mlp_cannot(kind):
    """The design goal: a frozen generator can express heads for classes it never saw."""
    target = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    classwise = _fit_heads(_make(kind, size=6), target)  # K = 36 >= D
    paper = _fit_heads(_make("task-mlp", size=6, hidden=16), target)  # heads confined to a 16-dim span
    assert classwise < 1e-3
    assert paper > 0.2


def test_auto_prototype_size_keeps_a_task_within_half_a_linear_head():
    assert [auto_prototype_size(d, 1) for d in (576, 960, 1280, 32)] == [16, 21, 25, 4]
    assert auto_prototype_size(1280, 3) == 14 and auto_prototype_size(2, 1) == 1


@pytest.mark.parametrize("kind", ["classwise-linear", "classwise", "task-mlp", "linear-head"])
def test_vjp_matches_autograd(kind):
    gen = _make(kind, num_classes=3).double()
    with torch.no_grad():  # non-zero last layer so the MLP path contributes to the gradient
        for p in gen.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = torch.randn(gen.param_shape(3), dtype=torch.float64, requires_grad=True)
    grad_head = torch.randn(3, D, dtype=torch.float64)
    (expected,) = torch.autograd.grad(gen(params), params, grad_head)
    assert torch.allclose(gen.vjp(params.detach(), grad_head), expected, rtol=1e-10, atol=1e-12)


def test_every_registered_kind_has_a_module_and_nothing_else_does():
    assert set(FACTORIES) == set(GENERATOR_KINDS)


@pytest.mark.parametrize("kind", [k.name for k in GENERATOR_KINDS.values() if k.prototypes])
def test_a_kind_is_linear_exactly_when_its_heads_are_linear_in_the_prototypes(kind):
    gen = _make(kind)
    with torch.no_grad():
        for layer in getattr(gen, "mlp", []):  # a trained MLP: the zero-initialised last layer hides it
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight)
        a, b = torch.randn(2, *gen.param_shape(3))
        additive = torch.allclose(gen(a + b), gen(a) + gen(b), atol=1e-5)
    assert additive == GENERATOR_KINDS[kind].linear


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown generator 'mlp'; choose one of: classwise-linear, classwise"):
        _make("mlp")
