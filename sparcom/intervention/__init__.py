"""Running a model on records with components switched off, shared by every stage that measures
what a component does (docs/method.md section 6): the ablation now, an effect estimate later.

- `hooks`: switching neurons, expert neurons and experts off, always undone.
- `response_nll`: the mean NLL of reference responses, teacher-forced.
"""
