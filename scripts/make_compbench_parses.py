"""Make ``src/eclipse_prior/evaluation/compbench_data/parses.json``: spaCy ``en_core_web_sm`` parses of every shipped
T2I-CompBench prompt, so the benchmark parses them as the reference does without spaCy installed.

Needs spaCy and its English pipeline (``pip install 'eclipse-prior[compbench]'``, or spaCy plus an
``en_core_web_sm`` wheel of the same minor version). Run from the repository root:

    PYTHONPATH=src python scripts/make_compbench_parses.py [--check]

``--check`` rewrites nothing: it parses again and fails if the shipped file differs (other spaCy or model version,
changed prompts). The file records the spaCy and model versions that made it. ``--agreement`` needs no spaCy: it
prints, per category, how often the rule chunker (the fallback without spaCy) gives what the shipped spaCy parses
give, for the parts of the prompt each category's scoring reads.
"""

from __future__ import annotations

import argparse
import json
import sys

from eclipse_prior.evaluation import compbench


def make_parses() -> dict:
    import spacy

    parser = compbench.SpacyParser()
    prompts: list[str] = []
    files = []
    for ps in compbench.load_prompt_sets():  # the shipped val prompts
        files.append(ps.path.name)
        prompts.extend(ps.prompts)
    parses = {}
    for text in dict.fromkeys(prompts):
        parse = parser.parse(text)
        doc = parser.nlp(text)
        # the stored form must give back spaCy's own chunk texts and token texts
        assert parse.noun_chunks == [c.text for c in doc.noun_chunks], text
        assert "".join(t.text + t.whitespace for t in parse.tokens) == doc.text, text
        parses[text] = compbench.parse_to_json(parse)
    return {
        "made_by": "scripts/make_compbench_parses.py",
        "spacy": spacy.__version__,
        "model": "en_core_web_sm",
        "model_version": parser.nlp.meta.get("version"),
        "model_package": parser.package,
        "model_spacy_git_version": parser.nlp.meta.get("spacy_git_version"),
        "files": files,
        "n_prompts": len(parses),
        "format": "parses[prompt] = {tokens: [[text, whitespace, pos_, tag_], ...], chunks: [[start, end], ...]}",
        "parses": parses,
    }


def agreement() -> list[str]:
    """Per shipped category: prompts whose rule-chunker questions / complex CLIPScore text / detector objects
    (reference rules) equal those of the shipped spaCy parse, and prompts whose questions the chunk filter changes."""
    shipped = compbench.PromptParser("auto")
    rules = compbench.RuleParser()
    lines = ["category    prompts  questions  clip_text  objects  filtered"]
    for ps in compbench.load_prompt_sets():
        n = len(ps.prompts)
        same_q = same_text = same_obj = filtered = 0
        for text in ps.prompts:
            ref, rule = shipped.parse(text), rules.parse(text)
            assert ref.source == "shipped", text
            same_q += compbench.vqa_questions(rule) == compbench.vqa_questions(ref)
            complex_prompt = ps.category == "complex"
            same_text += compbench.clipscore_text(rule, True) == compbench.clipscore_text(ref, True)
            same_obj += compbench.spatial_query(rule, complex_prompt) == compbench.spatial_query(ref, complex_prompt)
            unfiltered = [compbench.reference_question(f"{c}?") for c in ref.noun_chunks[: compbench.MAX_NOUN_PHRASES]]
            filtered += unfiltered != compbench.vqa_questions(ref)
        metric = compbench.CATEGORY_METRIC[ps.category]
        cells = [
            f"{same_q / n:.1%}" if metric in ("blip_vqa", "3_in_1") else "-",
            f"{same_text / n:.1%}" if metric == "3_in_1" else "-",
            f"{same_obj / n:.1%}" if metric in ("spatial", "3_in_1") else "-",
            str(filtered) if metric in ("blip_vqa", "3_in_1") else "-",
        ]
        lines.append(f"{ps.category:<12}{n:>7}  {cells[0]:>9}  {cells[1]:>9}  {cells[2]:>7}  {cells[3]:>8}")
    lines.append("(share of prompts where the rule chunker agrees with the shipped spaCy parses, for what each "
                 "category's scoring reads; filtered: prompts whose questions drop a 'top'/'the side'/'the left'/"
                 "'the right' chunk)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    ap.add_argument("--agreement", action="store_true", help="rule chunker vs shipped parses (no spaCy needed)")
    args = ap.parse_args()
    if args.agreement:
        print("\n".join(agreement()))
        return 0
    data = make_parses()
    path = compbench.packaged_prompt_dir() / compbench.PARSES_FILE
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=False) + "\n"
    if args.check:
        same = path.is_file() and path.read_text(encoding="utf-8") == text
        print(f"{path}: {'up to date' if same else 'DIFFERS'} ({data['n_prompts']} prompts, spaCy {data['spacy']}, "
              f"en_core_web_sm {data['model_version']})")
        return 0 if same else 1
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}: {data['n_prompts']} prompts, spaCy {data['spacy']}, en_core_web_sm {data['model_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
