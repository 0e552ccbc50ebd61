"""Multi-scale deformable attention: the C++/CUDA extension against the official outputs and the reference."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dat_smt.ops import MSDeformAttn, ms_deform_attn_reference, multi_scale_deformable_attention
from dat_smt.ops._extension import CSRC_DIR, load_extension

FIXTURE_CASES = ("basic", "odd", "realistic")
ARG_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
GRAD_NAMES = ("value", "sampling_locations", "attention_weights")


@pytest.fixture(scope="session")
def extension() -> dict:
    """Builds the extension once per session (the first build takes ~20-60 s, later sessions hit the cache)."""
    status = load_extension()
    if not status["cpu"]:
        pytest.skip(f"MSDA extension unavailable: {status['reason']}")
    return status


@pytest.fixture(scope="session")
def msda_fixture(reference_dir: Path) -> dict:
    path = reference_dir / "fixtures" / "msda_ref.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return load_file(path)


def make_problem(shapes, batch, heads, channels, queries, points, low=0.0, high=1.0, dtype=torch.float64, seed=0):
    """Random MSDA inputs with locations uniform in [low, high] and softmax-normalised weights."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator, dtype=dtype)
    unit = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype)
    locations = low + (high - low) * unit
    logits = torch.randn(batch, queries, heads, levels * points, generator=generator, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": locations,
        "attention_weights": weights,
    }


def run_with_grads(inputs: dict, grad_output: torch.Tensor, backend: str):
    """Output and the gradients of (output * grad_output).sum() w.r.t. value, locations and weights."""
    leaves = {k: v.detach().clone().requires_grad_(k in GRAD_NAMES) for k, v in inputs.items()}
    if backend == "reference":
        output = ms_deform_attn_reference(**leaves)
    else:
        output = multi_scale_deformable_attention(**leaves, backend=backend)
    output.backward(grad_output)
    return output.detach(), [leaves[name].grad for name in GRAD_NAMES]


def fixture_backends(extension_status: dict):
    backends = ["reference"]
    if extension_status["cpu"]:
        backends.append("cpp")
    if extension_status["cuda"] and torch.cuda.is_available():
        backends.append("cuda")
    return backends


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_every_backend_reproduces_official_fixture(msda_fixture, case, dtype):
    for backend in fixture_backends(load_extension()):
        device = "cuda" if backend == "cuda" else "cpu"
        inputs = {name: msda_fixture[f"{case}.{name}"].to(device) for name in ARG_NAMES}
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        grad_output = msda_fixture[f"{case}.grad_output"].to(device, dtype)
        output, grads = run_with_grads(inputs, grad_output, backend)
        expected = [msda_fixture[f"{case}.{name}"] for name in
                    ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")]
        for name, got, want in zip(("output", *GRAD_NAMES), [output, *grads], expected):
            error = (got.cpu().double() - want).abs().max().item()
            if dtype == torch.float64:
                assert error <= 1e-10, f"{backend} {case} {name}: max error {error}"
            else:
                scale = want.abs().max().item()
                assert error <= 1e-5 * scale, f"{backend} {case} {name}: error {error} vs scale {scale}"


RANDOM_PROBLEMS = [
    # shapes, batch, heads, channels, queries, points, location range
    ([(7, 5), (4, 9), (3, 2), (1, 3)], 2, 3, 5, 11, 3, (-0.2, 1.2)),
    ([(1, 17), (5, 1)], 1, 2, 7, 1, 2, (-3.0, 4.0)),
    ([(13, 11)], 3, 1, 33, 6, 1, (-0.5, 1.5)),
    ([(9, 14), (5, 7), (3, 4)], 2, 4, 8, 19, 4, (0.0, 1.0)),
    ([(6, 10), (3, 5)], 1, 2, 16, 23, 2, (-0.1, 1.1)),
    ([(11, 8), (6, 4), (3, 2), (2, 1)], 2, 8, 32, 17, 4, (-0.3, 1.3)),
    ([(5, 5), (2, 3)], 1, 2, 64, 9, 3, (-1.0, 2.0)),
    ([(1, 1), (2, 2)], 2, 1, 3, 4, 5, (-2.0, 2.0)),
]


@pytest.mark.parametrize("problem_id", range(len(RANDOM_PROBLEMS)))
def test_cpp_matches_reference_on_random_problems(extension, problem_id):
    shapes, batch, heads, channels, queries, points, (low, high) = RANDOM_PROBLEMS[problem_id]
    inputs = make_problem(shapes, batch, heads, channels, queries, points, low, high, seed=problem_id)
    grad_output = torch.randn(batch, queries, heads * channels, dtype=torch.float64)
    output, grads = run_with_grads(inputs, grad_output, "cpp")
    expected_output, expected_grads = run_with_grads(inputs, grad_output, "reference")
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-10)
    for name, got, want in zip(GRAD_NAMES, grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("channels", [8, 32, 12])
def test_cpp_matches_reference_float32(extension, channels):
    inputs = make_problem([(9, 7), (5, 4)], 2, 3, channels, 13, 4, -0.2, 1.2, dtype=torch.float32, seed=channels)
    grad_output = torch.randn(2, 13, 3 * channels)
    output, grads = run_with_grads(inputs, grad_output, "cpp")
    expected_output, expected_grads = run_with_grads(inputs, grad_output, "reference")
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_custom_op_registration_passes_opcheck(extension):
    inputs = make_problem([(4, 5), (2, 3)], 2, 2, 8, 3, 2, -0.1, 1.1, seed=4)
    args = tuple(inputs[name].requires_grad_(name in GRAD_NAMES) for name in ARG_NAMES)
    torch.library.opcheck(torch.ops.dat_smt.ms_deform_attn.default, args)


def test_cpp_gradcheck(extension):
    generator = torch.Generator().manual_seed(7)
    inputs = make_problem([(4, 5), (3, 2)], 2, 2, 3, 3, 2, seed=7)
    shapes = inputs["spatial_shapes"]
    # Pixel coordinates at integer + [0.2, 0.8]: away from the kinks of bilinear interpolation and the border.
    size_xy = torch.stack([shapes[:, 1], shapes[:, 0]], -1).double()[None, None, None, :, None, :]
    base = torch.floor(torch.rand(inputs["sampling_locations"].shape, generator=generator, dtype=torch.float64)
                       * (size_xy + 1)) - 1
    pixels = base + 0.2 + 0.6 * torch.rand(base.shape, generator=generator, dtype=torch.float64)
    locations = ((pixels + 0.5) / size_xy).requires_grad_()
    value = inputs["value"].requires_grad_()
    weights = inputs["attention_weights"].requires_grad_()

    def op(value, locations, weights):
        return multi_scale_deformable_attention(
            value, shapes, inputs["level_start_index"], locations, weights, backend="cpp"
        )

    assert torch.autograd.gradcheck(op, (value, locations, weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_round_trip(extension, dtype):
    inputs = make_problem([(8, 6), (4, 3)], 1, 2, 16, 10, 3, dtype=torch.float32, seed=3)
    low = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in low.items()}
    grad_output = torch.randn(1, 10, 32).to(dtype)
    output, grads = run_with_grads(low, grad_output, "cpp")
    expected_output, expected_grads = run_with_grads(upcast, grad_output.float(), "cpp")
    assert output.dtype == dtype and all(grad.dtype == dtype for grad in grads)
    # Computed in float32, so the only error is the final rounding to the low precision dtype.
    torch.testing.assert_close(output, expected_output.to(dtype), rtol=0, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(output.float(), ms_deform_attn_reference(**upcast), rtol=2e-2, atol=2e-2)


def test_cpp_backward_is_deterministic(extension):
    inputs = make_problem([(12, 10), (6, 5)], 2, 4, 32, 300, 4, 0.3, 0.7, dtype=torch.float32, seed=5)
    grad_output = torch.randn(2, 300, 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = run_with_grads(inputs, grad_output, "cpp")
        second = run_with_grads(inputs, grad_output, "cpp")
        torch.set_num_threads(1)
        single = run_with_grads(inputs, grad_output, "cpp")
    finally:
        torch.set_num_threads(threads)
    for run in (second, single):
        assert torch.equal(first[0], run[0])
        for got, want in zip(first[1], run[1]):
            assert torch.equal(got, want)


def test_auto_uses_extension_and_accepts_non_contiguous_inputs(extension):
    inputs = make_problem([(5, 6), (3, 3)], 2, 3, 4, 7, 2, seed=2)
    strided = dict(inputs)
    strided["value"] = inputs["value"].transpose(2, 3).contiguous().transpose(2, 3)
    strided["sampling_locations"] = inputs["sampling_locations"].flip(-1).contiguous().flip(-1)
    strided["attention_weights"] = inputs["attention_weights"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided["value"].is_contiguous() and not strided["attention_weights"].is_contiguous()
    expected = ms_deform_attn_reference(**inputs)
    for backend in ("auto", "cpp"):
        torch.testing.assert_close(multi_scale_deformable_attention(**strided, backend=backend), expected,
                                   rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="backend='cuda' needs cuda tensors"):
        multi_scale_deformable_attention(**inputs, backend="cuda")


def _corrupt(inputs: dict, name: str, tensor) -> dict:
    return {**inputs, name: tensor}


BAD_INPUTS = {
    "backend": (lambda x: x, "backend must be one of", ValueError),
    "value_rank": (lambda x: _corrupt(x, "value", x["value"].flatten(2)), r"value must be \(N, S, M, D\)", ValueError),
    "value_int": (lambda x: _corrupt(x, "value", x["value"].long()), "value must be a floating point", TypeError),
    "wrong_S": (lambda x: _corrupt(x, "value", x["value"][:, 1:]), "S = 38 positions", ValueError),
    "shapes_float": (lambda x: _corrupt(x, "spatial_shapes", x["spatial_shapes"].double()),
                     "spatial_shapes must be an integer", TypeError),
    "shapes_rank": (lambda x: _corrupt(x, "spatial_shapes", x["spatial_shapes"].flatten()),
                    r"spatial_shapes must be \(L, 2\)", ValueError),
    "starts": (lambda x: _corrupt(x, "level_start_index", x["level_start_index"] + 1),
               "level_start_index must be the exclusive cumsum", ValueError),
    "starts_shape": (lambda x: _corrupt(x, "level_start_index", x["level_start_index"][:1]),
                     r"level_start_index must be \(2,\)", ValueError),
    "locations_rank": (lambda x: _corrupt(x, "sampling_locations", x["sampling_locations"][..., 0]),
                       r"sampling_locations must be \(N, Lq, M, L, P, 2\)", ValueError),
    "locations_heads": (lambda x: _corrupt(x, "sampling_locations", x["sampling_locations"][:, :, :1]),
                        r"sampling_locations must be \(N, Lq, M, L, P, 2\) = \(1, 3, 2, 2, 2, 2\)", ValueError),
    "locations_dtype": (lambda x: _corrupt(x, "sampling_locations", x["sampling_locations"].float()),
                        "sampling_locations must have the dtype of value", TypeError),
    "weights_shape": (lambda x: _corrupt(x, "attention_weights", x["attention_weights"][..., :1]),
                      r"attention_weights must be \(N, Lq, M, L, P\)", ValueError),
    "weights_not_tensor": (lambda x: _corrupt(x, "attention_weights", 1.0), "attention_weights must be a torch.Tensor",
                           TypeError),
    "mixed_devices": (lambda x: _corrupt(x, "attention_weights", x["attention_weights"].to("meta")),
                      "attention_weights is on meta but value is on cpu", ValueError),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(case):
    corrupt, message, error = BAD_INPUTS[case]
    inputs = corrupt(make_problem([(5, 6), (3, 3)], 1, 2, 4, 3, 2))
    backend = "gpu" if case == "backend" else "auto"
    with pytest.raises(error, match=message):
        multi_scale_deformable_attention(**inputs, backend=backend)


FALLBACK_SCRIPT = """
import json, warnings
import torch
from dat_smt.ops import ms_deform_attn_reference, multi_scale_deformable_attention
shapes = torch.tensor([[4, 5], [2, 3]])
starts = torch.tensor([0, 20])
value = torch.randn(1, 26, 2, 4, dtype=torch.float64)
locations = torch.rand(1, 3, 2, 2, 2, 2, dtype=torch.float64)
weights = torch.rand(1, 3, 2, 2, 2, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outputs = [multi_scale_deformable_attention(value, shapes, starts, locations, weights) for _ in range(3)]
try:
    multi_scale_deformable_attention(value, shapes, starts, locations, weights, backend="cpp")
    cpp_error = None
except RuntimeError as error:
    cpp_error = str(error)
expected = ms_deform_attn_reference(value, shapes, starts, locations, weights)
print(json.dumps({
    "warnings": [str(w.message) for w in caught if "deformable attention" in str(w.message)],
    "equal": all(torch.equal(out, expected) for out in outputs),
    "cpp_error": cpp_error,
}))
"""


@pytest.mark.parametrize(
    "env_update, reason",
    [
        ({"DAT_SMT_DISABLE_EXTENSION": "1"}, "DAT_SMT_DISABLE_EXTENSION"),
        ({"CXX": "no-such-compiler"}, "no C++ compiler"),
    ],
    ids=["disabled", "no_compiler"],
)
def test_unavailable_extension_falls_back_with_one_warning(env_update, reason):
    env = {**os.environ, **env_update, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1
    assert reason in report["warnings"][0] and "reference" in report["warnings"][0]
    assert report["equal"]
    assert report["cpp_error"] is not None and "backend='cpp'" in report["cpp_error"] and reason in report["cpp_error"]


def _module_inputs(batch=2, queries=5, d_model=32, boxes=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    reference = torch.rand(batch, queries, 2, 4 if boxes else 2, generator=generator)
    return (
        torch.randn(batch, queries, d_model, generator=generator),
        reference,
        torch.randn(batch, 39, d_model, generator=generator),
        shapes,
        starts,
    )


def _module(seed=0):
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with torch.no_grad():  # leave the ring initialisation so the samples spread out
        module.sampling_offsets.weight.normal_(0, 0.1)
        module.attention_weights.weight.normal_(0, 0.1)
    return module


@pytest.mark.parametrize("boxes", [False, True])
def test_module_matches_reference_backend(extension, boxes):
    module = _module()
    args = _module_inputs(boxes=boxes)
    reference_module = _module()
    reference_module.backend = "reference"
    torch.testing.assert_close(module(*args), reference_module(*args), rtol=1e-5, atol=1e-6)


def _plain_module_forward(module, query, reference_points, input_flatten, spatial_shapes, level_start_index):
    n, lq, _ = query.shape
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    value = module.value_proj(input_flatten).view(n, -1, heads, module.d_model // heads)
    offsets = module.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
    weights = module.attention_weights(query).view(n, lq, heads, levels * points).softmax(-1)
    normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).float()
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    output = ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, locations, weights.view(n, lq, heads, levels, points)
    )
    return module.output_proj(output)


def test_module_point_locations_give_the_plain_formula_values_and_gradients():
    module = _module()
    module.backend = "reference"
    query, reference_points, *rest = _module_inputs()
    query.requires_grad_()
    reference_points.requires_grad_()
    inputs = [query, reference_points, *module.parameters()]
    output = module(query, reference_points, *rest)
    grads = torch.autograd.grad(output.square().sum(), inputs)
    expected = _plain_module_forward(module, query, reference_points, *rest)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_matches_eager(extension):
    module = _module()
    args = _module_inputs()
    eager = module(*args)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    output = compiled(*args)
    output.square().sum().backward()
    torch.testing.assert_close(output, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip([p.grad for p in module.parameters()], eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_export(extension):
    module = _module().eval()
    args = _module_inputs()
    exported = torch.export.export(module, args)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "dat_smt.ms_deform_attn.default" in targets
    torch.testing.assert_close(exported.module()(*args), module(*args), rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager(extension):
    module = _module()
    args = _module_inputs()
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cuda_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), str(CSRC_DIR)]
    command = [
        nvcc, "-c", str(CSRC_DIR / "ms_deform_attn_cuda.cu"), "-o", str(tmp_path / "ms_deform_attn_cuda.o"),
        # torch >= 2.10 headers require C++20 (C++17 is rejected by ATen.h).
        "-std=c++20", "-arch=sm_80", "-O1", *cpp_extension.COMMON_NVCC_FLAGS,
        *[f"-I{path}" for path in includes],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "ms_deform_attn_cuda.o").stat().st_size > 0
