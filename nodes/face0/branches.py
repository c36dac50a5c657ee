"""What the text_only and face_only branches of Face0's three-way guider carry besides their context (issue 21).

A ComfyUI conditioning is a list of entries ``[context, options]``; graph nodes put into the options what the
sampler applies per entry: ControlNet / T2I-Adapter (``control``), GLIGEN, area / mask / strength (regional
prompts), hook groups, timestep ranges. A graph wired as for KSampler puts them on positive and negative only.

The rule (``conditional_branch``): **ε̃ stands where positive stands in CFG, so the three conditional branches carry
what positive carries; the unconditional ε(∅) carries what negative carries.** Per entry of positive:

* an entry made by ProjectToContext (marked with ``MARK``) has counterparts in text_only / face_only (entries with
  the same mark, from the same ProjectToContext run and entry); each counterpart gets a *copy* of that entry's
  extras, group by group (``EXTRA_GROUPS``), for the groups it does not carry itself, so a ControlNet applied before
  ProjectToContext (text_only already has it) is kept and not applied twice;
* any other entry (another prompt combined in, e.g. ConditioningSetArea on a second text) is added to text_only and
  face_only as it is, so ε̃ = the regional blend of [Face0's mix, that prompt], the blend KSampler makes of
  [positive, that prompt] (ComfyUI blends entries with weights from area/mask/strength only, so the blend commutes
  with the affine mix when every branch has the same entries).

An entry whose context tensor is also in the branch (the same prompt wired into both by hand) is matched to it, not
added twice. Branches without marks (built by hand) are otherwise matched to positive by position. Entries of a
branch that match nothing are kept. Nothing is mutated: lists and option dicts are new; tensors and ControlNet
objects are shared (one ControlNet object on all four branches keeps them in one batch).
"""

from __future__ import annotations

import uuid

MARK = "facecond_face0_entry"  # (ProjectToContext run id, entry index) on every output entry of ProjectToContext

# Option keys written by ComfyUI's conditioning nodes, grouped by what they do together; a branch entry that has any
# key of a group keeps its own group. control: ControlNetApply(Advanced), T2I-Adapter; gligen: GLIGENTextBoxApply;
# region: ConditioningSetArea(Percentage/Strength), ConditioningSetMask; hooks: SetClipHooks and
# ConditioningSetProperties; timesteps: ConditioningSetTimestepRange.
EXTRA_GROUPS = {
    "control": ("control", "control_apply_to_uncond"),
    "gligen": ("gligen",),
    "region": ("area", "mask", "strength", "set_area_to_bounds", "mask_strength"),
    "hooks": ("hooks",),
    "timesteps": ("start_percent", "end_percent"),
}


def mark_entries(*conditionings):
    """ProjectToContext: mark entry i of each of its outputs with (run id, i), in place on its own fresh dicts."""
    run = uuid.uuid4().hex
    for conditioning in conditionings:
        for i, (_, opts) in enumerate(conditioning):
            opts[MARK] = (run, i)


def _with_extras(entry, source):
    """A copy of ``entry`` with ``source``'s extras for the groups ``entry`` lacks."""
    ctx, opts = entry
    opts = opts.copy()
    for keys in EXTRA_GROUPS.values():
        if not any(k in opts for k in keys):
            opts.update({k: source[1][k] for k in keys if k in source[1]})
    return [ctx, opts]


def conditional_branch(positive, branch):
    """The conditioning the guider evaluates for text_only or face_only: ``branch`` completed by the rule above."""
    if branch is None:
        return None
    marked = [opts.get(MARK) for _, opts in branch]
    by_mark = any(m is not None for m in marked)

    def counterparts(j, entry):
        same = [k for k, (ctx, _) in enumerate(branch) if ctx is entry[0]]  # wired into the branch too
        if same or by_mark:
            return same or [k for k, m in enumerate(marked) if m is not None and m == entry[1].get(MARK)]
        return [j] if j < len(branch) else []

    out, used = [], set()
    for j, entry in enumerate(positive):
        match = counterparts(j, entry)
        if match:
            out += [_with_extras(branch[k], entry) for k in match]
            used.update(match)
        else:
            out.append([entry[0], entry[1].copy()])  # a prompt of positive's own: shared by every conditional branch
    out += [[ctx, opts.copy()] for k, (ctx, opts) in enumerate(branch) if k not in used]
    return out
