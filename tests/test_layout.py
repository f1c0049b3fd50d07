"""The shape of the code: harnesses and backends name no op (adding one adds no line to them), no function over
60 lines but the kernels that are one loop nest, and each op's footprint (the files that name it) reported."""
import ast
import re
import subprocess

from conftest import ROOT
from gptfast.ops import OPS

# Read the op list from the op modules (spec.OPS): none of these may name an op.
GENERIC = ["benchmarks/bench_ops.py", "benchmarks/make_auto_table.py", "gptfast/compare/op_check.py",
           "gptfast/compare/__init__.py", ".ci/triton_aot_check.py", ".ci/cuda_check.sh", "CMakeLists.txt",
           "gptfast/ops/auto.py", "gptfast/ops/registry.py", "gptfast/ops/extension.py", "gptfast/ops/spec.py",
           "gptfast/ops/reference.py", "gptfast/ops/torch_builtins.py", "gptfast/ops/triton/__init__.py",
           "csrc/cpu/register.cpp", "csrc/cpu/kernels.h", "csrc/isa/module.cpp", "tests/test_op_contract.py"]
# One loop nest each (a GPU kernel's body, a CPU micro-kernel): longer than 60 lines, not split on purpose.
LOOP_NESTS = {"csrc/cuda/attention.cu": {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"},
              "csrc/cuda/attention_tc.cu": {"attn_fwd_tc_kernel", "attn_bwd_dkdv_tc_kernel"},
              "csrc/cpu/attention_tiles.h": {"tile_accumulate"}}
# Users of the ops: the model, generation, training, integrations, scripts, the end-to-end benchmarks and the
# model-level comparison - and the fused decoding block, which is made of the other ops' kernels.
USERS = ("gptfast/model/", "gptfast/generate.py", "gptfast/training/", "gptfast/integrations/", "scripts/",
         "gptfast/commands/",
         "benchmarks/bench_hf.py", "benchmarks/bench_train.py", "benchmarks/bench_book.py",
         "benchmarks/bench_generate.py", "gptfast/compare/model_check.py", "csrc/cpu/decode_parts.h",
         # and their tests
         "tests/test_model.py", "tests/test_generate.py", "tests/test_quantize.py", "tests/test_training",
         "tests/test_resume.py", "tests/test_distributed.py", "tests/test_cli.py", "tests/test_transformers_integration.py",
         "tests/test_export.py", "tests/test_gpt2_weights.py", "tests/test_bench_hf.py", "tests/test_bench_train.py",
         "tests/test_bench_generate.py", "tests/test_llama.py", "tests/test_transformers_llama.py")


def belongs_to_another_op(path: str, op) -> bool:
    """A file of a more specific op built from this one (its module, kernels, tests: named after it - the LM head +
    loss's for the cross-entropy and the linear layer, the fused decoding block's for GELU): a user of this op."""
    stem = path.rsplit("/", 1)[-1].split(".")[0].removeprefix("test_").removeprefix("avx512_")
    return any(len(other.name) > len(op.name) and stem.startswith(other.name) for other in OPS.values())


def op_pattern(op):
    """The op's name or a kernel op's as code names it: quoted, after a dot, before a call, a file name - not the
    English word in prose ("the linear layers")."""
    names = "|".join(map(re.escape, sorted({op.name, *op.kernels})))
    return re.compile(rf"(?<=[\"'`.])({names})(?!\w)|(?<!\w)({names})(?=[\"'`(]|\.(py|cpp|cu|h)\b)|"
                      rf"(?<![\w.])({names})_(fwd|bwd|cpu|cuda|kernels)\b|(?<![\w.])({names})(?=\s*[=:,)\]])")


def code_text(path) -> str:
    """A file's text without PyTorch's own functions of the same names (F.gelu, torch.nn.functional.cross_entropy)."""
    return re.sub(r"\b(F|torch|functional|nn|aten)\.\w+", "", (ROOT / path).read_text(errors="ignore"))


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [f for f in out if (ROOT / f).exists()]


def test_harnesses_and_backends_name_no_op():
    for f in GENERIC:
        text = code_text(f)
        for op in OPS.values():
            hit = op_pattern(op).search(text)
            assert hit is None, f"{f} names the op {op.name!r} ({hit.group(0)!r}): read it from gptfast.ops.OPS"


def python_functions(path):
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def cpp_functions(path):
    """(name, lines) of each function defined at namespace level: a line opening a definition, to its brace."""
    lines = (ROOT / path).read_text().split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(?!namespace|struct|class|enum|TORCH_|#|//|\s|template)[\w:<>,*&\s()]*?(\w+)\(", lines[i])
        if m and not lines[i].rstrip().endswith(";"):
            name = [n for n in re.findall(r"(\w+)\(", lines[i]) if n != "__launch_bounds__"][0]
            j = i
            while j < len(lines) and "{" not in lines[j] and not lines[j].rstrip().endswith(";"):
                j += 1
            if j < len(lines) and "{" in lines[j]:
                depth, k = 0, j
                while k < len(lines):
                    depth += lines[k].count("{") - lines[k].count("}")
                    if depth == 0:
                        break
                    k += 1
                yield name, k - i + 1
                i = k
        i += 1


def test_no_function_over_sixty_lines():
    long = []
    for f in tracked("gptfast/*.py", "gptfast/**/*.py", "benchmarks/*.py"):
        long += [(f, n, length) for n, length in python_functions(f) if length > 60]
    for f in tracked("csrc/*.cpp", "csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh"):
        long += [(f, n, length) for n, length in cpp_functions(f)
                 if length > 60 and n not in LOOP_NESTS.get(f, set())]
    assert not long, long


# The code files an op may take: its module, the package's import line, its CPU kernel and AVX-512 build, its CUDA
# kernel, launch header and glue, the CUDA check program, its Triton kernel file, its tests.
MAX_FILES = 10
SPLIT = {"causal_attention": 4}   # attention's CPU kernels in three files (forward, backward, decoding) + their tiles


def test_each_op_takes_at_most_ten_files():
    """The code files that name each op (or its kernel ops) besides its users (model, generation, training,
    integrations, scripts, the ops built from it): printed with -s, never the generic files above."""
    code = [f for f in tracked() if re.search(r"\.(py|cpp|h|cu|cuh|sh)$|CMakeLists\.txt$", f)
            and not f.startswith("benchmarks/results") and f != "tests/test_layout.py"]   # (this file counts them)
    texts = {f: code_text(f) for f in code}
    for op in OPS.values():
        pattern = op_pattern(op)
        files = [f for f in code if not f.startswith(USERS) and not belongs_to_another_op(f, op)
                 and pattern.search(texts[f])]
        assert not set(files) & set(GENERIC)
        print(f"{op.name}: {len(files)} files: {' '.join(files)}")
        assert len(files) <= MAX_FILES + SPLIT.get(op.name, 0), (op.name, files)


def test_the_model_file_is_the_architecture_alone():
    """A learner reading gpt.py top to bottom meets no training precision, fused decoding or quantization
    machinery: each lives in its own module behind a hook gpt.py names once (weight_for, run_block,
    queries_keys_values, lm_head_loss)."""
    text = (ROOT / "gptfast/model/gpt.py").read_text()
    tree = ast.parse(text)
    for node in ast.walk(tree):                                  # docstrings and comments may point to where
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):   # they live
            node.body = node.body[1:] or [ast.Pass()]
    code = ast.unparse(tree)
    for word in ("working", "autocast", "bfloat16", "quantiz", "int8", "W_qkv", "scales", "decode_block",
                 "decode_weights", "fused_decoding", "BlockWeights"):
        assert word not in code, f"gpt.py's code mentions {word!r}: that belongs to its own module"
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes == {"Linear", "LayerNorm", "GELU", "FeedForward", "CausalSelfAttention", "DropoutAdd",
                       "TransformerBlock", "GPTModel"}
