"""The table of sensitive and privileged instructions, generated from the semantics registry.

Callouts are numbered here; the runtime registers one handler per callout name.
"""
from .semantics import BY_NAME, CALLOUT_INFO

CALLOUTS = sorted(CALLOUT_INFO)
_IDS = {name: i for i, name in enumerate(CALLOUTS)}


def callout_id(name):
    return _IDS[name]


def callout_name(cid):
    return CALLOUTS[cid]


def table():
    """Rows (instruction, handling, why, does, ends_block) for every sensitive instruction:
    those translated into VMM callouts and those virtualized inline by the translation."""
    rows = []
    for name in CALLOUTS:
        info = CALLOUT_INFO[name]
        for m in info["mnemonics"]:
            ends = BY_NAME[m].ends_block if m in BY_NAME and BY_NAME[m].callout == name else True
            rows.append((m, "callout " + name, info["why"], info["does"], ends))
    for m, info in sorted(BY_NAME.items()):
        if info.callout and info.callout not in CALLOUT_INFO:
            rows.append((m, "inline", info.why, info.does, info.ends_block))
    return rows
