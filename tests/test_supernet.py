"""The weight-sharing supernet (nas.supernet): an extracted candidate is the supernet on that
path, training reaches only the shared slices a candidate uses, BatchNorm recalibration, and
sandwich training that leaves every candidate a classifier."""

from __future__ import annotations

import random

import pytest
import torch

from nas.builder import build
from nas.pipeline import get_dataset
from nas.space import load_space, parse_space
from nas.supernet import Picker, SuperNet, recalibrate_bn, train_supernet
from nas.train import accuracy

# every block type, elastic depth, width, kernel and expansion (1 included: an mbconv without
# its expand layer), a stage that may be left out, and a searchable stem
SPACE = parse_space({
    "name": "elastic", "stem_channels": [8, 16], "stem_kernel": [3, 5], "stem_stride": [1, 2],
    "stages": [
        {"block": ["conv", "dsconv", "factorized", "mbconv", "skip"], "depth": [1, 2], "width": [8, 16],
         "kernel": [3, 5], "expansion": [1, 2, 4]},
        {"block": ["conv", "dsconv", "factorized", "mbconv"], "depth": [1, 2, 3], "width": [16, 24, 32],
         "kernel": [3, 5], "stride": 2, "expansion": [1, 4]},
    ],
})


@pytest.fixture(scope="module")
def data():
    return get_dataset("digits", 0)


def _net(data, space=SPACE) -> SuperNet:
    torch.manual_seed(0)
    return SuperNet(space, data.in_channels, data.input_size, data.num_classes)


def _archs(net: SuperNet, n: int = 12) -> list:
    rng = random.Random(1)
    return [net.sample("max"), net.sample("min"), *(net.sample("random", rng) for _ in range(n))]


def test_an_extracted_candidate_is_the_supernet_on_its_path(data):
    net = _net(data)
    archs = _archs(net)
    assert len({a.summary() for a in archs}) >= 10  # the picker covers the space
    assert any(b.type == "mbconv" and b.expansion == 1 for a in archs for b in a.blocks)
    x = data.x_val[:32]
    for arch in archs:
        sub = net.extract(arch)
        assert type(sub) is type(build(arch)) and str(sub) == str(build(arch))  # what scratch would build
        with torch.no_grad():
            net.eval()
            torch.testing.assert_close(net(x, arch), sub(x), rtol=0, atol=0)
            net.train(), sub.train()  # batch statistics: the same too
            torch.testing.assert_close(net(x, arch), sub(x), rtol=1e-5, atol=1e-5)


def test_a_step_on_one_candidate_changes_only_the_weights_it_uses(data):
    net = _net(data)
    arch = net.sample("min")
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(net(data.x_train[:64], arch), data.y_train[:64]).backward()
    opt.step()
    used = net.tensors(arch)
    stem = net.stem[0].weight
    k = arch.stem_kernel
    c = arch.stem_channels
    changed = (stem.detach() != before["stem.0.weight"])
    assert changed[:c].any() and not changed[c:].any()  # outside its channels: untouched
    if k < stem.shape[-1]:
        lo = (stem.shape[-1] - k) // 2
        assert not changed[:, :, :lo].any()  # outside its kernel's centre: untouched
    untouched = [n for n in before if n.startswith("stages.") and ".mbconv." in n and "weight" in n]
    assert all(torch.equal(net.state_dict()[n], before[n]) for n in untouched if "dsconv" not in n)
    assert set(used) == set(build(arch).state_dict())


def test_batchnorm_recalibration_estimates_the_data_statistics(data):
    net = _net(data)
    sub = net.extract(net.sample("max"))
    x = data.x_train[:512]
    recalibrate_bn(sub, x, batch=128)
    with torch.no_grad():
        stem_out = sub.stem[0](x)  # what the first BatchNorm sees
    torch.testing.assert_close(sub.stem[1].running_mean, stem_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not sub.training and sub.stem[1].momentum == 0.1  # left as it was found, in eval mode


def test_sandwich_training_trains_the_largest_and_the_smallest_candidate(data):
    """(Random candidates that mix block types across stages stay far behind at this budget:
    see the supernet notes in the README.)"""
    net = _net(data, load_space("default"))
    seen = []
    stats = train_supernet(net, data.x_train, data.y_train, epochs=3, lr=0.05, seed=0,
                           on_epoch=lambda e, loss: seen.append((e, loss)))
    assert stats.steps == 3 * (len(data.y_train) // 128) and [e for e, _ in seen] == [1, 2, 3]
    accs = [accuracy(recalibrate_bn(net.extract(net.sample(p)), data.x_train[:1000]), data.x_val, data.y_val)
            for p in ("max", "min")]
    assert accs[0] > 0.9 and accs[1] > 0.3, accs  # chance is 0.1


def test_elastic_width_depth_and_kernel_share_well_within_one_block_type(data):
    """Candidates of one block type that differ in depth, width, kernel and stem: after uniform
    single-path training, each one extracted and recalibrated is a good classifier."""
    space = parse_space({"name": "conv", "stem_channels": [8, 16], "stages": [
        {"block": "conv", "depth": [1, 2], "width": [8, 16], "kernel": [3, 5]},
        {"block": "conv", "depth": [1, 2], "width": [16, 32], "kernel": [3, 5], "stride": 2}]})
    net = _net(data, space)
    train_supernet(net, data.x_train, data.y_train, epochs=8, lr=0.05, seed=0)
    rng = random.Random(7)
    accs = [accuracy(recalibrate_bn(net.extract(net.sample("random", rng)), data.x_train[:1000]), data.x_val,
                     data.y_val) for _ in range(4)]
    assert min(accs) > 0.85, accs


def test_the_picker_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="policy 'big'"):
        Picker("big")


def test_the_typed_sandwich_trains_every_block_types_full_width(data):
    """"fixed" trains the largest and smallest of BLOCK_CAPACITY only (mbconv and dsconv here):
    with no random paths a conv block's weights never move. "typed" draws each stage's type per
    step, so within a few steps the full width of the conv blocks trains too."""
    space = parse_space({"name": "two", "stem_channels": [8], "stages": [
        {"block": ["conv", "dsconv", "mbconv"], "depth": [1], "width": [8, 16], "kernel": [3]}]})
    x, y = data.x_train[:512], data.y_train[:512]
    moved = {}
    for sandwich in ("fixed", "typed"):
        net = _net(data, space)
        before = {k: v.clone() for k, v in net.stages[0]["conv"].state_dict().items()}
        train_supernet(net, x, y, epochs=2, lr=0.05, seed=0, randoms=0, sandwich=sandwich)
        after = net.stages[0]["conv"].state_dict()
        moved[sandwich] = max(float((after[k] - v).abs().max()) for k, v in before.items() if v.is_floating_point())
    assert moved["fixed"] == 0.0 and moved["typed"] > 1e-3, moved


def test_an_unknown_sandwich_is_refused(data):
    with pytest.raises(ValueError, match="sandwich 'wide' is not one of fixed, typed"):
        train_supernet(_net(data), data.x_train[:256], data.y_train[:256], epochs=1, sandwich="wide")


def test_the_kernel_transform_is_learned_and_extracted_with_the_candidate(data):
    """Once-for-All's kernel transformation: a 3x3 (1x3, 3x1) kernel is the 5x5's centre times
    a learned matrix; an extracted candidate carries the transformed weights, training moves the
    matrices, and the default supernet has none."""
    assert len(_net(data).transforms) == 0
    torch.manual_seed(0)
    net = SuperNet(SPACE, data.in_channels, data.input_size, data.num_classes, kernel_transform=True)
    assert {k.rsplit("__", 1)[1] for k in net.transforms} == {"3x3", "1x3", "3x1"}
    assert all(torch.equal(m, torch.eye(len(m))) for m in net.transforms.values())
    before = {k: v.detach().clone() for k, v in net.transforms.items()}
    train_supernet(net, data.x_train[:256], data.y_train[:256], epochs=1, batch_size=64)
    moved = [k for k, v in net.transforms.items() if not torch.equal(v, before[k])]
    assert moved and "stem_0_weight__3x3" in moved
    x = data.x_val[:32]
    small = [a for a in _archs(net, 20) if any(b.kernel == 3 for b in a.blocks)]
    assert small
    for arch in small:
        sub = net.extract(arch)
        with torch.no_grad():
            net.eval()
            torch.testing.assert_close(net(x, arch), sub(x), rtol=1e-6, atol=1e-6)
        # the centre alone is not what the candidate holds
        src = net.stem[0].weight if arch.stem_kernel == 3 else None
        if src is not None:
            centre = src[: sub.stem[0].weight.shape[0], :, 1:4, 1:4]
            assert not torch.allclose(sub.stem[0].weight, centre)
    # a kernel of 1 takes the single centre tap, untransformed
    one = parse_space({"name": "k1", "stem_kernel": [1, 3], "stages": [{"block": ["conv", "factorized"], "width": 8,
                                                                        "kernel": [1, 3]}]})
    net = SuperNet(one, data.in_channels, data.input_size, data.num_classes, kernel_transform=True)
    rng = random.Random(0)
    for arch in [net.sample("min"), *(net.sample("random", rng) for _ in range(8))]:
        with torch.no_grad():
            net.eval()
            torch.testing.assert_close(net(x, arch), net.extract(arch)(x), rtol=0, atol=0)
