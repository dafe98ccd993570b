"""Can SmolLM2-135M-Instruct do the sums when asked to write its working? (issue 16's response-length axis)

    python benchmarks/scratchpad_probe.py                       # the prompts of docs/reproducing-dwd.md
    python benchmarks/scratchpad_probe.py --terms 2 --max 20 --temperature 0.7 --instruction "..."

Samples ``--prompts`` × ``--samples`` completions per instruction from the fetched model (`dgg model fetch
smollm2-135m-instruct`) through its chat template and scores them with the lenient parser of the bundled
arithmetic configs. Prints accuracy, mean completion length and one example per prompt.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from dgg.models import resolve
from dgg.tasks import lenient_answer

PROBES = [  # (instruction, terms, largest term, temperature)
    ("Add the numbers step by step, then write the final answer as: Answer: N", 3, 99, 1.0),
    ("Think step by step briefly, then give the final answer as: Answer: N", 2, 99, 1.0),
    ("Add the numbers one at a time, showing each partial sum, then write: Answer: N", 3, 30, 1.0),
    ("Reply with just the number.", 3, 99, 1.0),
    ("Explain your addition in one sentence, then give the final answer as: Answer: N", 2, 20, 0.7),
    ("Reply with just the number.", 2, 20, 0.7),
]


def probe(model, tokenizer, instruction, terms, largest, temperature, prompts, samples, max_new_tokens, rng):
    correct, lengths, started = 0, [], time.perf_counter()
    for _ in range(prompts):
        numbers = [rng.randint(1, largest) for _ in range(terms)]
        question = " + ".join(map(str, numbers)) + " ="
        ids = tokenizer.apply_chat_template([{"role": "user", "content": f"{question}\n{instruction}"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                             num_return_sequences=samples, pad_token_id=tokenizer.eos_token_id)
        replies = out[:, ids["input_ids"].shape[1]:]
        for reply in replies:
            text = tokenizer.decode(reply, skip_special_tokens=True)
            lengths.append(int((reply != tokenizer.eos_token_id).sum()))
            correct += lenient_answer(text) == str(sum(numbers))
        print(f"  {question} {sum(numbers)} | {text[:120]!r}")
    n = prompts * samples
    print(f"== {instruction!r}, {terms} terms ≤ {largest}, T {temperature}: {correct}/{n} correct, "
          f"{sum(lengths) / n:.1f} tokens on average, {time.perf_counter() - started:.0f} s\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--instruction", help="one instruction instead of the bundled probes")
    parser.add_argument("--terms", type=int, default=3)
    parser.add_argument("--max", type=int, default=99, help="largest term")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = resolve(args.model)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    probes = [(args.instruction, args.terms, args.max, args.temperature)] if args.instruction else PROBES
    rng = random.Random(args.seed)
    for instruction, terms, largest, temperature in probes:
        probe(model, tokenizer, instruction, terms, largest, temperature, args.prompts, args.samples,
              args.max_new_tokens, rng)


if __name__ == "__main__":
    main()
