"""Judging samples: metric maths, the domain classifier, Inception, and `ddpmkit eval`'s reports.

metrics      Fréchet distance, precision/recall, Inception score, blur (any feature space)
domain       a small classifier per dataset, trained once and cached: FD_dom, accuracy
inceptionv3  the FID InceptionV3 network (TF-compatible; loads torch-fidelity's weights file)
inception    FID and IS with it: weights (cache, download, safe loading), reference statistics
report       evaluate a run or real images; the report and its table
"""
