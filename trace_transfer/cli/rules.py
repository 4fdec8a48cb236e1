"""`trace-transfer rules`: check, draft, list and show architecture rule files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trace_transfer.cli._errors import Group
from trace_transfer.cli._table import echo_table
from trace_transfer.rules.resolve import LAYOUTS

_RULES_HELP = "Rule file (or directory of them) to use instead of / before the shipped ones."


@click.group("rules", cls=Group)
def command() -> None:
    """Architecture rule files: which tensor plays which role.

    \b
    Examples:
      trace-transfer rules check ./Qwen3-8B                  # coverage of a checkpoint
      trace-transfer rules init ./new-arch --out my_rules/new.yaml
      trace-transfer rules check ./new-arch --rules my_rules/new.yaml
      trace-transfer rules list
      trace-transfer rules show qwen3
    """


@command.command("check")
@click.argument("model")
@click.option("--rules", "rules_path", type=click.Path(exists=True, path_type=Path), help=_RULES_HELP)
@click.option("--layout", type=click.Choice([*LAYOUTS, "both"]), default="auto", show_default=True,
              help="Names from the safetensors files, from the model class (meta device), or both.")
@click.option("--json", "as_json", is_flag=True, help="Print the coverage as JSON.")
@click.option("--verbose", "-v", "verbose", is_flag=True, help="List every matched tensor with its slots.")
def check(model: str, rules_path: Path | None, layout: str, as_json: bool, verbose: bool) -> None:
    """Coverage of MODEL (local dir or hub id) by its rule file; exits 1 on any gap.

    Reports matched, ignored and unmatched tensors, unused rules and every problem with the rule
    file's line and the fix. Only the config and safetensors headers are read, never the weights.

    \b
    Example:
      trace-transfer rules check ./tiny-phi3 --layout both
    """
    from trace_transfer.rules import check_model

    layouts = ["checkpoint", "model"] if layout == "both" else [layout]
    failed = False
    results = []
    for lay in layouts:
        res = check_model(model, rules_path, layout=lay)
        results.append(res)
        failed |= not res.ok
    if as_json:
        click.echo(json.dumps([{**r.summary(), "unmatched_tensors": r.unmatched, "ignored_tensors": r.ignored,
                                "unused": r.unused_rules, "problems": r.problems, "warnings": r.warnings}
                               for r in results], indent=2))
    else:
        for res in results:
            _print_coverage(res, verbose)
    if failed:
        sys.exit(1)


def _print_coverage(res, verbose: bool) -> None:
    s = res.summary()
    click.echo(f"rule file: {s['rule_file']} (family {s['family']})")
    click.echo(f"model:     {s['model']}: {s['tensors']} tensors, {s['num_layers']} layers"
               + (f", {s['num_experts']} experts" if s["num_experts"] else "")
               + (f", storage variant {s['variant']}" if s["variant"] else ""))
    echo_table(["matched", "ignored", "unmatched", "unused rules", "problems"],
           [[s["matched"], s["ignored"], s["unmatched"], s["unused_rules"], s["problems"]]])
    if verbose:
        click.echo("\nmatched:")
        for name, m in res.matches.items():
            click.echo(f"  {name}  ->  {', '.join(str(x) for x in m.slots)}")
    if res.ignored:
        by_pattern: dict[str, int] = {}
        for p in res.ignored.values():
            by_pattern[p] = by_pattern.get(p, 0) + 1
        click.echo("\nignored: " + ", ".join(f"{p} ({n})" for p, n in by_pattern.items()))
    if res.unmatched:
        click.echo("\nunmatched tensors:")
        for name, hint in res.unmatched.items():
            click.echo(f"  {name}: {hint}")
    if res.unused_rules:
        click.echo("\nunused rules:")
        for r in res.unused_rules:
            click.echo(f"  {r}")
    if res.inactive_rules:
        click.echo("\noff for this config (when: false): " + "; ".join(res.inactive_rules))
    if res.unused_ignores:
        click.echo("\nnote: ignore patterns that matched nothing (fine for defensive patterns): " + ", ".join(res.unused_ignores))
    if res.warnings:  # doubts, not gaps: the exit status stays 0
        click.echo(f"\n{len(res.warnings)} warning(s):")
        for w in res.warnings:
            click.echo(f"  - {w}")
    if res.problems:
        click.echo(f"\n{len(res.problems)} problem(s):")
        for p in res.problems:
            click.echo(f"  - {p}")
    else:
        click.echo("\nOK: every tensor is matched exactly once or ignored, and every rule is used."
                   + (" Read the warnings above." if res.warnings else ""))
    click.echo("")


@command.command("init")
@click.argument("model")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), help="Write the draft here (default: stdout).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="auto", show_default=True,
              help="Draft from the safetensors names or from the model class's parameter names.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def init(model: str, out: Path | None, layout: str, force: bool) -> None:
    """Draft a rule file for MODEL's architecture from its tensor names.

    Common names are recognised; whatever cannot be guessed (unknown tensors, fused-part sizes and
    layouts) is written as `?` with a `# TODO` comment. The draft does not load until every TODO
    is resolved; then check it with `rules check MODEL --rules FILE`.

    \b
    Example:
      trace-transfer rules init ./tiny-falcon --out my_rules/falcon.yaml
    """
    from trace_transfer.checkpoint import write_text_atomic
    from trace_transfer.rules import draft_rules

    text = draft_rules(model, layout=layout)
    todos = sum(1 for line in text.splitlines() if "# TODO" in line and not line.startswith("#"))
    if out is None:
        click.echo(text, nl=False)
    else:
        if out.exists() and not force:
            raise click.ClickException(f"{out} exists; pass --force to overwrite it")
        write_text_atomic(out, text)
        click.echo(f"wrote {out}", err=True)
    click.echo(f"{todos} TODO(s) to resolve; then: trace-transfer rules check {model} --rules {out or 'FILE'}", err=True)


@command.command("list")
@click.option("--rules", "rules_path", type=click.Path(exists=True, path_type=Path), help=_RULES_HELP)
@click.option("--roles", is_flag=True, help="List the role vocabulary instead.")
def list_(rules_path: Path | None, roles: bool) -> None:
    """List the rule files on the search path (or, with --roles, the role vocabulary).

    \b
    Example:
      TRACE_TRANSFER_RULES_PATH=my_rules trace-transfer rules list
    """
    from trace_transfer.rules import CUSTOM_ROLE_PREFIX, ROLES, available_rules, rules_search_path

    if roles:
        echo_table(["role", "meaning"], [[r, d] for r, d in ROLES.items()])
        click.echo(f"\nArchitecture-specific tensors: {CUSTOM_ROLE_PREFIX}<name> (reported as having no counterpart on transfer).")
        return
    found = available_rules(rules_path)
    seen: set[str] = set()
    rows = []
    for rs in found:
        shadowed = rs.family in seen
        seen.add(rs.family)
        rows.append([rs.family + (" (shadowed)" if shadowed else ""), ",".join(rs.spec.match.model_type),
                     ",".join(rs.spec.match.architectures), rs.origin, rs.path])
    echo_table(["family", "model_type", "architectures", "origin", "path"], rows)
    click.echo("\nsearch path: " + " : ".join(str(p) for p in rules_search_path()))


@command.command("show")
@click.argument("arch")
@click.option("--rules", "rules_path", type=click.Path(exists=True, path_type=Path), help=_RULES_HELP)
def show(arch: str, rules_path: Path | None) -> None:
    """Print the rule file for ARCH (family, model_type, architecture class or path).

    \b
    Example:
      trace-transfer rules show Phi3ForCausalLM
    """
    from trace_transfer.rules import get_rules

    rs = get_rules(arch, rules_path)
    click.echo(f"# {rs.path}")
    click.echo(rs.text, nl=False)
