"""TinyGPT (the student) and the teacher: any Hugging Face causal LM.

TinyGPT returns its outputs in Hugging Face's conventions (``.logits``,
``.hidden_states`` with the embeddings first and the last one after the final
layer norm, ``.attentions`` per block), so one code path serves student and
teacher in the losses.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TinyGPTConfig, TeacherConfig
from .errors import KdlibError

# The demo's teacher: GPT-2's architecture at a size that trains in a few minutes on 2 cores
# (kdlib.demo trains it; kdlib.speed counts its FLOPs for the plan before it exists).
DEMO_TEACHER_SHAPE = dict(n_layer=4, n_embd=160, n_head=4)


@dataclass
class CausalLMOutput:
    logits: Tensor  # [B, T, V]
    hidden_states: Optional[tuple[Tensor, ...]] = None  # n_layer + 1 of [B, T, d]
    attentions: Optional[tuple[Tensor, ...]] = None  # n_layer of [B, n_head, T, T]


def sinusoidal_positions(n_positions: int, dim: int) -> Tensor:
    """The fixed table of "Attention is all you need": sin on even, cos on odd dims. [n, dim]"""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]  # [n, 1]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # [dim/2]
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, need_weights: bool = False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × [B, T, C]
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # [B, nh, T, hs]
        if need_weights:
            # Explicit attention: the only way to get the probabilities out.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # [B, nh, T, T]
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf"))
            probs = F.softmax(att, dim=-1)
            y = self.attn_dropout(probs) @ v  # [B, nh, T, hs]
        else:
            probs = None
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # [B, T, C]
        return self.resid_dropout(self.c_proj(y)), probs


class MLP(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, need_weights: bool = False):
        a, probs = self.attn(self.ln_1(x), need_weights)
        x = x + a
        return x + self.mlp(self.ln_2(x)), probs


class TinyGPT(nn.Module):
    """A small GPT student; ``TinyGPT(TinyGPTConfig())`` is the original study's (50,951,680 parameters)."""

    def __init__(self, config: TinyGPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # fixed: a buffer, not a parameter, and not saved (it is rebuilt from the config)
            self.wpe = None
            self.register_buffer("pos_table", sinusoidal_positions(config.block_size, config.n_embd),
                                 persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> CausalLMOutput:
        """ids: [B, T] token ids, T <= block_size."""
        if ids.dim() != 2:
            raise KdlibError(f"TinyGPT takes token ids of shape [batch, time], got {tuple(ids.shape)}; "
                             "add a batch dimension with ids[None]")
        B, T = ids.shape
        if T > self.config.block_size:
            raise KdlibError(f"sequence of {T} tokens is longer than the model's block_size "
                             f"({self.config.block_size}); cut the input into windows")
        pos = self.wpe.weight[:T] if self.wpe is not None else self.pos_table[:T]  # [T, C]
        x = self.drop(self.wte(ids) + pos)  # [B, T, C]
        hidden = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, block in enumerate(self.h):
            x, probs = block(x, need_weights=output_attentions)
            if output_attentions:
                attentions.append(probs)
            if output_hidden_states and i < len(self.h) - 1:
                hidden.append(x)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden.append(x)  # the last state after the final norm, as in Hugging Face
        return CausalLMOutput(self.lm_head(x),
                              None if hidden is None else tuple(hidden),
                              None if attentions is None else tuple(attentions))


# --------------------------------------------------------------------------
# teacher


def _half_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        # Native bf16 needs compute capability 8 (Ampere); is_bf16_supported() also counts a T4's emulation.
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.float32


TEACHER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_teacher_dtype(name: str, device) -> torch.dtype:
    """The torch dtype of ``teacher.dtype`` on ``device``: "auto" is fp16 on a GPU (the half
    precision closest to fp32 for GPT-2's large-offset logits: docs/benchmarks.md, "Teacher
    precision") and float32 on a CPU (where half-precision matmuls are slow)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in TEACHER_DTYPES:
        raise KdlibError(f"unknown teacher dtype {name!r}; choose one of: auto, {', '.join(TEACHER_DTYPES)}")
    return TEACHER_DTYPES[name]


def device_of(device: Union[str, torch.device, None]) -> torch.device:
    """``device`` as a torch device this machine has (None: the CPU), or ``KdlibError`` saying why not."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KdlibError(f"unknown device {device!r}; give cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # meta holds no values; mps and the rest are not kdlib's
        raise KdlibError(f"device {device!r} is not one kdlib runs on; give cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KdlibError(f"no CUDA GPU here (device {device!r}); run on the CPU (--device cpu, or leave "
                             "--device out), or on a machine with a GPU (on Colab: Runtime -> Change runtime "
                             "type -> Hardware accelerator -> T4 GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KdlibError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def _no_safetensors(name: str, error: Exception) -> Optional[str]:
    """Why ``name`` failed to load, when it is that it has no safetensors weights; else None."""
    folder = Path(name)
    if folder.is_dir():
        bins = sorted(p.name for p in folder.glob("*.bin"))
        if bins and not any(folder.glob("*.safetensors")):
            return f"has no safetensors weights (only {', '.join(bins)}, a pickle)"
        return None
    return f"has no safetensors weights ({error})" if "safetensors" in str(error) else None  # a hub repository


def _from_pretrained(name: str, dtype: torch.dtype, attn: str, revision: Optional[str]) -> nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers >= 4.56 takes ``dtype``; older releases only ``torch_dtype``.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        # safetensors only: a pytorch_model.bin is a pickle, and unpickling runs whatever code it holds
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, attn_implementation=attn,
                                                    use_safetensors=True, **{dtype_kw: dtype})
    except (OSError, ValueError) as e:  # missing files, no network, a folder without a model
        why = _no_safetensors(name, e)
        if why:
            raise KdlibError(f"teacher {name!r} {why}; kdlib never unpickles: convert it once, where you trust "
                             "the file (load it with transformers and save it again with "
                             "save_pretrained(folder, safe_serialization=True)), or use a model that ships "
                             "model.safetensors") from None
        raise KdlibError(f"cannot load teacher {name!r}: {e}. Give a Hugging Face model id reachable "
                         "from here, or a folder written by save_pretrained") from None


def load_teacher(name_or_path: Union[str, nn.Module, TeacherConfig] = "gpt2", *,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                 need_attentions: bool = False, revision: Optional[str] = None,
                 student_vocab_size: Optional[int] = None) -> nn.Module:
    """A frozen teacher: any Hugging Face causal LM by id, path, config, or an already-built model.

    Frozen means ``requires_grad=False`` and eval mode. On GPU it is loaded in
    half precision (bf16 where supported, else fp16), on CPU in float32.
    Attention maps need the eager attention implementation, chosen only when
    ``need_attentions`` (SDPA is faster and returns no maps). With
    ``student_vocab_size`` the vocabularies are checked to match.
    """
    device = device_of(device)
    if dtype is None:
        dtype = resolve_teacher_dtype(name_or_path.dtype, device) if isinstance(name_or_path, TeacherConfig) \
            else _half_dtype(device)
    attn = "eager" if need_attentions else "sdpa"
    if isinstance(name_or_path, TeacherConfig):
        cfg = name_or_path
        name_or_path = random_teacher(cfg.random_init) if cfg.random_init is not None else cfg.name
        revision = cfg.revision
    if isinstance(name_or_path, nn.Module):
        model = name_or_path
        if need_attentions:
            _use_eager_attention(model)
    else:
        model = _from_pretrained(str(name_or_path), dtype, attn, revision)
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    if student_vocab_size is not None:
        check_teacher_vocab(student_vocab_size, model)
    return model


def random_teacher(gpt2_config: dict, seed: int = 0) -> nn.Module:
    """A randomly initialised GPT-2-architecture model (``transformers.GPT2Config`` fields)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # Seeded on its own generator state, so building it never shifts the run's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, **gpt2_config))


def _use_eager_attention(model: nn.Module) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    elif hasattr(model, "config"):
        model.config._attn_implementation = "eager"


def teacher_vocab_size(teacher: nn.Module) -> int:
    """Size of the teacher's output distribution (its logits' last dimension)."""
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None:
        return head.weight.shape[0]
    return teacher.config.vocab_size


def check_teacher_vocab(student_vocab_size: int, teacher: nn.Module) -> None:
    """Refuse a teacher whose output distribution is not over the student's vocabulary."""
    v_t = teacher_vocab_size(teacher)
    if v_t != student_vocab_size:
        raise KdlibError(f"the student's vocabulary has {student_vocab_size} tokens but the teacher's "
                         f"has {v_t}: distillation compares distributions token by token, so build the "
                         f"student with vocab_size={v_t} and the teacher's tokenizer")


def teacher_shape(teacher: nn.Module) -> tuple[int, int]:
    """(number of blocks, hidden width) of a Hugging Face model or a TinyGPT."""
    cfg = teacher.config
    for layers, width in (("num_hidden_layers", "hidden_size"), ("n_layer", "n_embd")):
        if hasattr(cfg, layers) and hasattr(cfg, width):
            return int(getattr(cfg, layers)), int(getattr(cfg, width))
    raise KdlibError(f"cannot read the number of layers and hidden size from the teacher's config "
                     f"({type(cfg).__name__}); feature losses need both")


def supports_output(model: nn.Module, what: str) -> bool:
    """Whether ``model.forward`` accepts ``output_{what}`` (hidden_states, attentions)."""
    params = inspect.signature(model.forward).parameters
    return f"output_{what}" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def teacher_forward(teacher: nn.Module, ids: Tensor, hidden_states: bool = False,
                    attentions: bool = False):
    """The teacher's outputs for ``ids`` [B, T], under inference mode, features only when asked.

    Raises ``KdlibError`` if features were asked for and the model did not return them.
    """
    kwargs = {}
    if hidden_states:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    with torch.inference_mode():
        out = teacher(ids, **kwargs)
    for what, asked in (("hidden_states", hidden_states), ("attentions", attentions)):
        if asked and not getattr(out, what, None):
            hint = (" (attention maps need the eager attention implementation: "
                    "load_teacher(..., need_attentions=True))") if what == "attentions" else ""
            raise KdlibError(f"the teacher returned no {what}{hint}; the feature loss needs them")
    return out
