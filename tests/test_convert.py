"""PyTorch -> Flax weight conversion: numerical parity with torch and all-or-nothing errors.

torch is a test-only dependency. The torch modules below are written here with
torchvision's (ResNet), RD4AD's (BN_layer, de_resnet) and the CCL authors' (RDLGC) module
names; they are saved with torch.save, read back by the torch-free reader and converted.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl import flags
from torch import nn

from ccl_jax.weights import convert
from ccl_jax.models import ResNetEncoder, encoder_spec
from ccl_jax.weights.torch_checkpoint import load_state_dict
from ccl_jax.weights.encoder_weights import encoder_variables
from data_prep import convert_weights

# ----------------------------------------------------------------------------------------
# torch modules with torchvision / RD4AD / AD-LGC names.


def conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 1, stride, bias=False)


def deconv2x2(cin, cout):
  return nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride=1, shortcut=None, base_width=64, transpose=False):
    super().__init__()
    self.conv1 = deconv2x2(cin, planes) if transpose and stride == 2 else conv3x3(
        cin, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut_name = "upsample" if transpose else "downsample"
    setattr(self, self.shortcut_name, shortcut)

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = getattr(self, self.shortcut_name)
    return torch.relu(out + (x if shortcut is None else shortcut(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride=1, shortcut=None, base_width=64, transpose=False):
    super().__init__()
    width = int(planes * base_width / 64)
    self.conv1 = conv1x1(cin, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = deconv2x2(width, width) if transpose and stride == 2 else conv3x3(
        width, width, stride)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = conv1x1(width, planes * 4)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.shortcut_name = "upsample" if transpose else "downsample"
    setattr(self, self.shortcut_name, shortcut)

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = getattr(self, self.shortcut_name)
    return torch.relu(out + (x if shortcut is None else shortcut(x)))


def make_layer(block, cin, planes, blocks, stride, base_width, transpose=False, fan_in=None):
  """torchvision's _make_layer; `fan_in` is the first block's input (RD's neck: 3 * cin)."""
  fan_in = fan_in or cin
  shortcut = None
  if stride != 1 or cin != planes * block.expansion:
    first = (deconv2x2(fan_in, planes * block.expansion) if transpose
             else conv1x1(fan_in, planes * block.expansion, stride))
    shortcut = nn.Sequential(first, nn.BatchNorm2d(planes * block.expansion))
  layers = [block(fan_in, planes, stride, shortcut, base_width, transpose)]
  layers += [block(planes * block.expansion, planes, 1, None, base_width, transpose)
             for _ in range(1, blocks)]
  return nn.Sequential(*layers)


ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2], 64),
         "resnet50": (Bottleneck, [3, 4, 6, 3], 64),
         "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], 128)}


class TorchResNet(nn.Module):
  """torchvision.models.ResNet's layout (layer4 and fc included); returns layer1..3."""

  def __init__(self, name):
    super().__init__()
    block, layers, width = ARCHS[name]
    e = block.expansion
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = make_layer(block, 64, 64, layers[0], 1, width)
    self.layer2 = make_layer(block, 64 * e, 128, layers[1], 2, width)
    self.layer3 = make_layer(block, 128 * e, 256, layers[2], 2, width)
    self.layer4 = make_layer(block, 256 * e, 512, layers[3], 2, width)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(512 * e, 10)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    f1 = self.layer1(x)
    f2 = self.layer2(f1)
    return f1, f2, self.layer3(f2)


class BNLayer(nn.Module):
  """RD4AD's BN_layer (OCBE; also the CCL authors' MFF_OCE when `with_conv4` is False)."""

  def __init__(self, block, blocks, base_width, with_conv4=True):
    super().__init__()
    e = block.expansion
    self.bn_layer = make_layer(block, 256 * e, 512, blocks, 2, base_width, fan_in=3 * 256 * e)
    self.conv1 = conv3x3(64 * e, 128 * e, 2)
    self.bn1 = nn.BatchNorm2d(128 * e)
    self.conv2 = conv3x3(128 * e, 256 * e, 2)
    self.bn2 = nn.BatchNorm2d(256 * e)
    self.conv3 = conv3x3(128 * e, 256 * e, 2)
    self.bn3 = nn.BatchNorm2d(256 * e)
    if with_conv4:  # defined but never used by RD4AD's forward
      self.conv4 = conv1x1(1024 * e, 512 * e)
      self.bn4 = nn.BatchNorm2d(512 * e)

  def forward(self, x):
    l1 = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x[0]))))))
    l2 = torch.relu(self.bn3(self.conv3(x[1])))
    return self.bn_layer(torch.cat([l1, l2, x[2]], 1))


class DeResNet(nn.Module):
  """RD4AD's de_resnet decoder: layer1 (lowest resolution) .. layer3; outputs layer3 first."""

  def __init__(self, name):
    super().__init__()
    block, layers, width = ARCHS[name]
    e = block.expansion
    self.layer1 = make_layer(block, 512 * e, 256, layers[0], 2, width, transpose=True)
    self.layer2 = make_layer(block, 256 * e, 128, layers[1], 2, width, transpose=True)
    self.layer3 = make_layer(block, 128 * e, 64, layers[2], 2, width, transpose=True)

  def forward(self, x):
    a = self.layer1(x)
    b = self.layer2(a)
    return self.layer3(b), b, a


class ProjLayer(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.proj = nn.Sequential(
        nn.Conv2d(c, c // 2, 3, 1, 1), nn.InstanceNorm2d(c // 2), nn.LeakyReLU(),
        nn.Conv2d(c // 2, c // 4, 3, 1, 1), nn.InstanceNorm2d(c // 4), nn.LeakyReLU(),
        nn.Conv2d(c // 4, c // 2, 3, 1, 1), nn.InstanceNorm2d(c // 2), nn.LeakyReLU(),
        nn.Conv2d(c // 2, c, 3, 1, 1), nn.InstanceNorm2d(c), nn.LeakyReLU())

  def forward(self, x):
    return self.proj(x)


class MultiProjectionLayer(nn.Module):
  def __init__(self):
    super().__init__()
    self.proj_a, self.proj_b, self.proj_c = ProjLayer(256), ProjLayer(512), ProjLayer(1024)


class RDLGC(nn.Module):
  """The authors' CCL model layout (AD-LGC model/rd.py): teacher, MFF_OCE, projector, decoder."""

  def __init__(self, name):
    super().__init__()
    self.net_t = TorchResNet(name)
    del self.net_t.layer4, self.net_t.fc  # timm features_only stops at layer3
    self.mff_oce = BNLayer(Bottleneck, 3, 64, with_conv4=False)
    self.proj_layer = MultiProjectionLayer()
    self.net_s = DeResNet(name)

  def forward(self, feats):
    p = self.proj_layer
    projected = [p.proj_a(feats[0]), p.proj_b(feats[1]), p.proj_c(feats[2])]
    return self.net_s(self.mff_oce(projected))


def randomise(module: nn.Module, seed: int) -> nn.Module:
  """Random weights and non-trivial BatchNorm statistics, then eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else (
            m.weight.shape[0] * m.weight[0, 0].numel())
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return module.eval()


def save_and_read(obj, tmp_path, name, legacy=False):
  path = tmp_path / name
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
  return load_state_dict(path)


def numpy_state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def to_nhwc(t):
  return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def assert_close(got, want, tol=1e-4):
  got, want = np.asarray(got), want.detach().numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < tol, err


# ----------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_resnet_encoder_matches_torch_from_zip_and_legacy_files(name, tmp_path):
  torch_model = randomise(TorchResNet(name), seed=1)
  zip_sd = save_and_read(torch_model.state_dict(), tmp_path, "enc.pth")
  legacy_sd = save_and_read(torch_model.state_dict(), tmp_path, "enc_legacy.pth", legacy=True)
  reference = numpy_state(torch_model)
  for sd in (zip_sd, legacy_sd):
    assert sd.keys() == reference.keys()
    for k, v in reference.items():
      np.testing.assert_array_equal(sd[k], v)

  variables = convert.resnet_encoder_variables(zip_sd, name)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    want = torch_model(x)
  got = jax.jit(ResNetEncoder(encoder_spec(name)).apply)(variables, to_nhwc(x))
  for g, w in zip(got, want):
    assert_close(g, w)


@pytest.mark.parametrize("name,legacy", [("resnet18", True), ("wide_resnet50_2", False)])
def test_rd4ad_neck_and_decoder_match_torch(name, legacy, tmp_path):
  block, _, width = ARCHS[name]
  blocks = encoder_spec(name).neck_blocks
  bn = randomise(BNLayer(block, blocks, width), seed=2)
  decoder = randomise(DeResNet(name), seed=3)
  checkpoint = save_and_read({"bn": bn.state_dict(), "decoder": decoder.state_dict()},
                             tmp_path, "rd4ad.pth", legacy=legacy)
  variables = convert.rd4ad_variables(checkpoint, name)

  spec = encoder_spec(name)
  g = torch.Generator().manual_seed(4)
  feats = [torch.relu(torch.randn(2, c, 64 // s, 64 // s, generator=g))
           for c, s in zip(spec.channels, spec.strides)]
  with torch.no_grad():
    want = decoder(bn(feats))
  model = convert.rd4ad_model(name)
  got = jax.jit(model.apply)(variables, tuple(to_nhwc(f) for f in feats))
  for g_, w in zip(got, want):
    assert_close(g_, w)


def test_ccl_checkpoint_matches_torch_and_yields_its_teacher(tmp_path):
  name = "resnet50"
  torch_model = randomise(RDLGC(name), seed=5)
  state = save_and_read({"net": torch_model.state_dict(), "epoch": 3}, tmp_path, "ckpt.pth")
  variables = convert.ccl_variables(state, name)
  assert set(variables["params"]) == {"projector", "neck", "decoder"}

  spec = encoder_spec(name)
  g = torch.Generator().manual_seed(6)
  feats = [torch.randn(2, c, 64 // s, 64 // s, generator=g)
           for c, s in zip(spec.channels, spec.strides)]
  with torch.no_grad():
    want = torch_model(feats)
  got = jax.jit(convert.ccl_model(name).apply)(variables, tuple(to_nhwc(f) for f in feats))
  for g_, w in zip(got, want):
    assert_close(g_, w)

  teacher = convert.ccl_encoder_variables(state, name)
  x = torch.randn(1, 3, 64, 64, generator=g)
  with torch.no_grad():
    want = torch_model.net_t(x)
  got = jax.jit(ResNetEncoder(spec).apply)(teacher, to_nhwc(x))
  for g_, w in zip(got, want):
    assert_close(g_, w)


# ----------------------------------------------------------------------------------------
# Errors: listed by PyTorch name, never a partial result.


@pytest.fixture(scope="module")
def resnet18_state():
  return numpy_state(randomise(TorchResNet("resnet18"), seed=7))


def test_wrong_architecture_lists_keys(resnet18_state):
  with pytest.raises(ValueError) as e:
    convert.resnet_encoder_variables(resnet18_state, "wide_resnet50_2")
  message = str(e.value)
  assert "wide_resnet50_2" in message and "nothing was converted" in message
  assert "missing" in message and "layer1.0.conv3.weight" in message
  assert "wrong shape" in message
  assert "layer1.0.conv1.weight: checkpoint (64, 64, 3, 3), model (128, 64, 1, 1)" in message


def test_missing_unexpected_and_mis_shaped_keys_are_listed(resnet18_state):
  state = dict(resnet18_state)
  del state["layer2.1.bn2.running_var"]
  state["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  state["head.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    convert.resnet_encoder_variables(state, "resnet18", source="my.pth")
  message = str(e.value)
  assert message.startswith("my.pth does not match the resnet18 encoder")
  assert "missing (1): layer2.1.bn2.running_var (128,)" in message
  assert "unexpected (1): head.weight (3, 3)" in message
  assert "layer1.0.conv2.weight: checkpoint (64, 64, 1, 1), model (64, 64, 3, 3)" in message


def test_wrappers_and_data_parallel_prefix_are_unwrapped(resnet18_state):
  plain = convert.resnet_encoder_variables(resnet18_state, "resnet18")
  wrapped = {"state_dict": {f"module.{k}": v for k, v in resnet18_state.items()},
             "epoch": 1}
  again = convert.resnet_encoder_variables(wrapped, "resnet18")
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain, again)
  kernel = plain["params"]["layer1"]["0"]["conv1"]["kernel"]
  np.testing.assert_array_equal(
      kernel, resnet18_state["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
  assert plain["batch_stats"]["bn1"]["var"].dtype == np.float32


def test_rd4ad_and_ccl_structure_errors():
  with pytest.raises(ValueError, match="'bn': state_dict, 'decoder': state_dict"):
    convert.rd4ad_variables({"bn": {}}, "resnet18")
  with pytest.raises(ValueError, match="bottleneck encoder"):
    convert.ccl_variables({}, "resnet18")
  with pytest.raises(ValueError, match="net_t"):
    convert.ccl_encoder_variables({"mff_oce.conv1.weight": np.zeros((1,))}, "resnet50")


# ----------------------------------------------------------------------------------------
# Command line.


def _convert_weights(*args: str) -> int:
  """The program with these flags, in this process."""
  flag_values = flags.FlagValues()
  convert_weights.define_flags(flag_values)
  flag_values(["convert_weights", *args])
  return convert_weights.run(flag_values)


def test_cli_writes_a_file_the_config_loads(resnet18_state, tmp_path, capsys):
  source = tmp_path / "resnet18.pth"
  torch.save({k: torch.from_numpy(v) for k, v in resnet18_state.items()}, source)
  out = tmp_path / "resnet18.msgpack"
  assert _convert_weights(*["--kind", "resnet", "--encoder", "resnet18",
                               "--input", str(source), "--output", str(out)]) == 0
  assert "wrote" in capsys.readouterr().out
  loaded = encoder_variables(ResNetEncoder(encoder_spec("resnet18")), str(out), seed=0,
                             image_size=64)
  want = convert.resnet_encoder_variables(resnet18_state, "resnet18")
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         loaded, want)


def test_cli_bad_input_exits_non_zero_without_output(resnet18_state, tmp_path, capsys):
  out = tmp_path / "out.msgpack"
  truncated = tmp_path / "truncated.pth"
  torch.save({k: torch.from_numpy(v) for k, v in resnet18_state.items()}, truncated)
  truncated.write_bytes(truncated.read_bytes()[:5000])
  assert _convert_weights(*["--kind", "resnet", "--encoder", "resnet18", "--input",
                               str(truncated), "--output", str(out)]) == 1
  err = capsys.readouterr().err
  assert "truncated.pth" in err and "corrupt or truncated" in err
  assert _convert_weights(*["--kind", "rd4ad", "--encoder", "resnet18", "--input",
                               str(truncated.with_name("absent.pth")), "--output",
                               str(out)]) == 1
  assert "absent.pth" in capsys.readouterr().err
  whole = tmp_path / "r18.pth"
  torch.save({k: torch.from_numpy(v) for k, v in resnet18_state.items()}, whole)
  assert _convert_weights(*["--kind", "resnet", "--encoder", "resnet50", "--input",
                               str(whole), "--output", str(out)]) == 1
  assert "missing" in capsys.readouterr().err
  assert not out.exists()
