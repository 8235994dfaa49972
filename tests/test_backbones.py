"""timm bodies (`--backbone NAME`) and their local weights (`--backbone-weights`) in the autoencoder and the detector."""
import pytest
import torch

timm = pytest.importorskip('timm')

import finetune.__main__ as finetune_cli                                  # noqa: E402
from lesion_fastai.checkpoint import load_pretrained                     # noqa: E402
from lesion_fastai.models.detector import Detector                     # noqa: E402
from lesion_fastai.models.resnet import TimmEncoder                      # noqa: E402
from lesion_fastai.config import FinetuneConfig, PretrainConfig                     # noqa: E402
from lesion_fastai.finetuning import finetune                                    # noqa: E402
from lesion_fastai.pretraining import pretrain                                   # noqa: E402

NAME = 'resnet10t'   # a small timm ResNet: features at strides 2, 4, 8, 16, 32


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    "A timm model's whole state dict (classifier included), as a user's ImageNet file would hold it."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('weights') / f'{NAME}.pth'
    torch.save(timm.create_model(NAME, pretrained=False).state_dict(), path)
    return path


def test_timm_body_gives_timms_features_at_strides_4_to_32_with_the_files_weights(weights):
    enc = TimmEncoder(NAME, in_chans=1, weights=weights).eval()
    ref = timm.create_model(NAME, features_only=True, in_chans=1, out_indices=(1, 2, 3, 4), pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(weights))).eval()
    x, feats = torch.rand(2, 1, 64, 64), []
    h = enc.stem(x)
    for stage in enc.stages: h = stage(h); feats.append(h)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and enc.widths == tuple(f.shape[1] for f in feats)
    assert all(torch.equal(a, b) for a, b in zip(feats, ref(x)))
    sd = torch.load(weights)
    have = enc.state_dict()
    assert torch.equal(have['stages.1.layer2.0.conv1.weight'], sd['layer2.0.conv1.weight'])
    assert torch.allclose(have['stages.0.conv1.0.weight'], sd['conv1.0.weight'].sum(1, keepdim=True))   # RGB summed to 1 channel
    assert enc.encoder_args == {'backbone': NAME, 'in_chans': 1}


def test_untrained_timm_sandwich_computes_the_plain_body():
    torch.manual_seed(0)
    plain = Detector({'in_chans': 2, 'backbone': NAME}).eval()
    sandwich = Detector({'in_chans': 2, 'backbone': NAME}, sandwich='encoder').eval()
    sandwich.encoder.load_state_dict(plain.encoder.state_dict())
    x = torch.rand(2, 2, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(plain.features(x), sandwich.features(x)))


def test_bad_backbones_are_named():
    with pytest.raises(ValueError, match="--backbone 'no_such_net'"): Detector({'backbone': 'no_such_net'})
    with pytest.raises(ValueError, match='--backbone-weights loads a timm'): Detector({}, backbone_weights='w.pth')
    with pytest.raises(FileNotFoundError, match='no such file'): Detector({'backbone': NAME}, backbone_weights='/no/w.pth')


@pytest.mark.slow
def test_pretrain_records_the_backbone_and_finetune_rebuilds_it_or_transfers_from_weights(tiny_data, weights, tmp_path, capsys):
    pre = tmp_path / 'pre'
    pretrain(PretrainConfig(data=tiny_data, out=pre, epochs=1, bs=2, size=32, backbone=NAME, context=0))
    ckpt = load_pretrained(pre / 'pretrained.pth')
    assert ckpt['model_args']['encoder_args'] == {'backbone': NAME, 'in_chans': 1}
    m = finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'sw', epochs=1, bs=2, pretrained=pre / 'pretrained.pth'))
    assert m['config']['backbone'] == NAME and m['config']['freeze'] == 'sandwich' and m['parameters']['frozen'] > 0
    # ImageNet-style transfer: no checkpoint, the weights file, every layer trains (--freeze none by default)
    m = finetune(FinetuneConfig(data=tiny_data, out=tmp_path / 'tl', epochs=1, bs=2, size=32, backbone=NAME, backbone_weights=weights,
                                context=0))
    assert m['config']['freeze'] == 'full' and m['parameters']['frozen'] == 0
    for args, msg in ((['--pretrained', str(pre / 'pretrained.pth'), '--backbone', 'resnet'], 'disagrees with the checkpoint'),
                      (['--pretrained', str(pre / 'pretrained.pth'), '--backbone-weights', str(weights)], 'both set the encoder'),
                      (['--backbone-weights', str(weights), '--backbone', NAME, '--freeze', 'scratch'], '--freeze scratch ignores --backbone-weights'),
                      (['--backbone-weights', str(weights), '--backbone', NAME, '--freeze', 'sandwich', '--sandwich', 'decoder'],
                       "reads the pretrained autoencoder's decoder")):
        with pytest.raises(SystemExit) as e:
            finetune_cli.main(['--data', str(tiny_data), '--out', str(tmp_path / 'x'), '--epochs', '1', '--bs', '2', *args])
        assert msg in str(e.value.code) and not (tmp_path / 'x').exists()
