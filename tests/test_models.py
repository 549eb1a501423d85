"""Our MambaOut against timm's: names, sizes, logits, features, options of the registry."""
import pytest
import timm
import torch
from timm.data import resolve_data_config

from mambaout import create_model, list_models
from mambaout.checkpoint import load_weights, save_weights, to_original_layout
from mambaout.data.sampling import drop_draws
from mambaout.models.mambaout import PRETRAINED_CFGS, VARIANTS, GatedConvBlock
from mambaout.models.published import PUBLISHED

# Noise (std) added to timm's init, so every parameter (LayerScale, norms, biases) shapes the logits.
PERTURBATION = 0.02


def randomized_timm_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * PERTURBATION)
    return model


def drop_path_rates(model: torch.nn.Module) -> list[float]:
    return [getattr(block.drop_path, 'drop_prob', 0.0) for stage in model.stages for block in stage.blocks]


@pytest.mark.parametrize('name', [name for name in VARIANTS if timm.is_model(name)])  # the _ssm twins: test_ssm.py
def test_variant_matches_timm(name):
    reference = randomized_timm_model(name)
    model = create_model(name).eval()

    assert list(model.state_dict()) == list(reference.state_dict())
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == sum(p.numel() for p in reference.parameters())
    if name in PUBLISHED:
        assert num_params == PUBLISHED[name].params

    batch = 2 if name in ('mambaout_femto', 'mambaout_kobe') else 1
    images = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
        load_weights(model, reference.state_dict())
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-4)
        if name in PUBLISHED:  # the release layout maps onto the same weights
            for param in model.parameters():
                param.zero_()
            load_weights(model, to_original_layout(reference.state_dict()))
            torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-4)

        maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    dims = VARIANTS[name]['dims']
    assert [tuple(m.shape) for m in maps] == [(1, dim, 64 // stride, 64 // stride)
                                             for dim, stride in zip(dims, (4, 8, 16, 32), strict=True)]

    for key, value in model.pretrained_cfg.items():
        if key != 'url':  # timm has no URL for the original release
            assert reference.pretrained_cfg[key] == value, key
    assert resolve_data_config(model=model) == resolve_data_config(model=reference)


def test_pretrained_configs():
    assert list(PRETRAINED_CFGS) == list(VARIANTS) == list_models()
    for name in PUBLISHED:
        cfg = PRETRAINED_CFGS[name]
        assert (cfg['input_size'], cfg['crop_pct'], cfg['interpolation']) == ((3, 224, 224), 1.0, 'bicubic')
        assert cfg['url'] == f'https://github.com/yuweihao/MambaOut/releases/download/model/{name}.pth'
    assert list_models('*_rw') == [name for name in VARIANTS if name.endswith('_rw')]


def test_features_only():
    model = create_model('mambaout_femto', features_only=True).eval()
    assert not any(key.startswith('head.') for key in model.state_dict())
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [info['num_chs'] for info in model.feature_info] == [48, 96, 192, 288]
    assert [64 // m.shape[-1] for m in maps] == [info['reduction'] for info in model.feature_info] == [4, 8, 16, 32]
    assert all(m.is_contiguous() for m in maps)  # channels-first [B, C, H, W]


def test_forward_intermediates_selection():
    model = create_model('mambaout_femto').eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[0, -1], output_fmt='NHWC')
    assert [m.shape[-1] for m in maps] == [48, 288]
    assert torch.equal(final, maps[-1])


def test_forward_head():
    model = create_model('mambaout_femto', num_classes=10).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 64, 64))
        assert features.shape == (2, 2, 2, 288)  # channels-last
        assert model.forward_head(features, pre_logits=True).shape == (2, 4 * 288)
        assert model.forward_head(features).shape == (2, 10)


@pytest.mark.parametrize("keyed", [False, True])
def test_grad_checkpointing_gives_same_gradients(keyed):
    """Recomputed blocks drop the samples their first run dropped: keyed decisions are inputs; without them
    torch's checkpoint replays the generator."""
    images = torch.randn(2, 3, 32, 32)
    draws = drop_draws([5, 6], 18) if keyed else None

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = create_model('mambaout_femto', drop_path_rate=0.2, grad_checkpointing=checkpointing)
        torch.manual_seed(1)  # the same drop-path draws, which checkpointing must replay
        model(images, drop_draws=draws).square().mean().backward()
        return {name: param.grad for name, param in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_block_forms_compute_the_same_function(monkeypatch):
    """The sliced (CPU) and dense (GPU) block formulations: same logits and gradients from the same weights,
    'auto' taking the sliced one on a CPU from SLICED_MIN_ROWS rows on, the dense one below; a form that does
    not exist is refused."""
    from mambaout.models import mambaout as M

    ours = create_model('mambaout_femto', ls_init_value=0.5).train()  # LayerScale on: every parameter counts
    images = torch.randn(2, 3, 64, 64)

    def run(form: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ours.set_block_form(form)
        ours.zero_grad(set_to_none=True)
        logits = ours(images)
        logits.square().mean().backward()
        return logits.detach(), {key: p.grad.clone() for key, p in ours.named_parameters()}

    (sliced, sliced_grads), (dense, dense_grads), (auto, auto_grads) = run('sliced'), run('dense'), run('auto')
    torch.testing.assert_close(dense, sliced, rtol=1e-5, atol=1e-5)
    for key in sliced_grads:
        torch.testing.assert_close(dense_grads[key], sliced_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    assert not torch.equal(dense, sliced)  # two computations, not one
    # 2 x 16 x 16 rows at most: below the CPU's SLICED_MIN_ROWS
    assert torch.equal(auto, dense) and all(torch.equal(auto_grads[k], dense_grads[k]) for k in dense_grads)
    monkeypatch.setitem(M.SLICED_MIN_ROWS, 'cpu', 0)
    auto, auto_grads = run('auto')
    assert torch.equal(auto, sliced) and all(torch.equal(auto_grads[k], sliced_grads[k]) for k in sliced_grads)
    with pytest.raises(ValueError, match="block form must be one of"):
        ours.set_block_form('fused')


def test_keyed_drop_decisions_follow_the_sample():
    """With ``drop_draws`` a sample's stochastic depth and head dropout depend on its own draws only: not on the
    batch it is in nor on any generator's state; the draws' columns are the blocks, then the head's features."""
    model = create_model('mambaout_femto', num_classes=10, drop_path_rate=0.5, head_dropout=0.3).train()
    assert model.num_drop_sites == 18 + 4 * 288
    images, draws = torch.randn(4, 3, 32, 32), drop_draws([11, 12, 13, 14], model.num_drop_sites)
    torch.manual_seed(0)
    together = model(images, drop_draws=draws)
    torch.manual_seed(1)
    alone = torch.cat([model(images[i:i + 1], drop_draws=draws[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(images, drop_draws=drop_draws([1, 2, 3, 4], model.num_drop_sites)), together)
    with pytest.raises(ValueError, match=r"\[batch, num_drop_sites\] = \[4, 1170\]"):
        model(images, drop_draws=draws[:, :18])
    assert create_model('mambaout_femto', drop_path_rate=0.0).num_drop_sites == 0  # nothing random: no draws


def test_keyed_drop_path_is_inverted_dropout_with_an_fp32_scale():
    """A block keeps the branch scaled by 1/keep where the draw is below keep (in fp32, also under bf16 autocast,
    where timm's DropPath rounds 1/keep to bf16) and drops it elsewhere."""
    block = GatedConvBlock(16, drop_path=0.3)
    x = torch.randn(2, 5, 5, 16)
    branch = block.eval()(x) - x
    out = block.train()(x, torch.tensor([0.1, 0.8]))  # keep = 0.7: the first sample kept, the second dropped
    torch.testing.assert_close(out[0], x[0] + branch[0] / 0.7)
    assert torch.equal(out[1], x[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = block(x, torch.tensor([0.1, 0.1])) - x
        bf16_branch = block.eval()(x) - x
    assert bf16_branch.dtype == torch.float32 and kept.dtype == torch.float32
    torch.testing.assert_close(kept, bf16_branch * torch.tensor(1 / 0.7, dtype=torch.float32), rtol=0, atol=1e-6)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    model = create_model('mambaout_small', drop_path_rate=0.4)
    with torch.device('meta'):
        reference = timm.create_model('mambaout_small', drop_path_rate=0.4)
    assert drop_path_rates(model) == pytest.approx(torch.linspace(0, 0.4, 37).tolist())
    assert drop_path_rates(model) == drop_path_rates(reference)


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match='mambaout_femto') as info:
        create_model('mambaout_femtoo')
    assert 'mambaout_tiny' in str(info.value)


def test_timm_fallback():
    model = create_model('resnet18', num_classes=7, head_dropout=0.25).eval()
    assert isinstance(model, timm.models.ResNet) and model.drop_rate == 0.25
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_overrides():
    model = create_model('mambaout_femto', num_classes=10, head_dropout=0.3, in_chans=1, grad_checkpointing=True)
    assert model.head.dropout.p == 0.3 and all(stage.grad_checkpointing for stage in model.stages)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)

    headless = create_model('mambaout_femto', num_classes=0).eval()
    assert headless(torch.randn(2, 3, 32, 32)).shape == (2, 4 * 288)

    custom = create_model('mambaout_femto', depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), num_classes=5)
    assert [len(stage.blocks) for stage in custom.stages] == [1, 1, 2, 1]
    assert custom(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_reset_classifier():
    model = create_model('mambaout_femto').eval()
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert model.get_classifier().bias.abs().sum() == 0  # freshly initialised
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        model.reset_classifier(0)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4 * 288)


@pytest.mark.parametrize('layout, filename', [('timm', 'model.safetensors'), ('original', 'mambaout_femto.pth')])
def test_weight_files_reproduce_timm_logits(tmp_path, layout, filename):
    reference = randomized_timm_model('mambaout_femto')
    save_weights(reference.state_dict(), tmp_path / filename, layout=layout)
    model = create_model('mambaout_femto', checkpoint=tmp_path / filename).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-4)
