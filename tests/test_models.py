import pytest
import torch

from agent.models import ARCHITECTURES, arch_id, build_model, count_params, lineage, param_shapes


@pytest.mark.parametrize(
    "name,classes,inputs,params",
    [("mlp4", 10, (3, 784), 476_490), ("intrusion_dnn", 5, (3, 122), 211_077), ("mobilenet_s", 10, (3, 1, 28, 28), None)],
)
def test_architectures_give_logits_over_classes(name, classes, inputs, params):
    model = build_model(name, classes, seed=0)
    out = model(torch.rand(*inputs))
    assert out.shape == (3, classes)
    if params is not None:
        assert count_params(model) == params


def test_mobilenet_accepts_flat_images():
    model = build_model("mobilenet_s", 10, seed=0).eval()
    x = torch.rand(2, 784)
    assert torch.allclose(model(x), model(x.view(2, 1, 28, 28)))


def test_arch_id_depends_on_architecture_not_weights():
    a, b = build_model("mlp4", 10, seed=0), build_model("mlp4", 10, seed=1)
    assert arch_id(a) == arch_id(b)
    assert arch_id(a) != arch_id(build_model("mlp4", 5, seed=0))
    assert arch_id(a) != arch_id(build_model("intrusion_dnn", 10, seed=0))
    assert len({arch_id(build_model(n, 10)) for n in ARCHITECTURES}) == len(ARCHITECTURES)


def test_lineage_names_exact_weights():
    a, b = build_model("mlp4", 10, seed=0), build_model("mlp4", 10, seed=0)
    assert lineage(a) == lineage(b) == lineage(a.state_dict())
    assert lineage(a) != lineage(build_model("mlp4", 10, seed=1))
    with torch.no_grad():
        b.net[1].weight[0, 0] += 1e-6
    assert lineage(a) != lineage(b)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = build_model("mlp4", 10, seed=3)
    assert torch.rand(1) == expected
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), build_model("mlp4", 10, seed=3).parameters()))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="model .resnet9000. is unknown: the built-ins are"):
        build_model("resnet9000", 10)


def test_param_shapes_ordered():
    shapes = param_shapes(build_model("mlp4", 10))
    assert list(shapes)[0] == "net.1.weight" and shapes["net.1.weight"] == (512, 784)
