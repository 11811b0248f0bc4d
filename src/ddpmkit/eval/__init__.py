"""Judging samples: metric maths, the domain classifier, Inception, and `ddpmkit eval`'s reports.

metrics    Fréchet distance, precision/recall, Inception score, blur (any feature space)
domain     a small classifier per dataset, trained once and cached: FD_dom, accuracy
inception  torch-fidelity's InceptionV3: FID and IS (optional extra)
report     evaluate a run or real images; the report and its table
"""
