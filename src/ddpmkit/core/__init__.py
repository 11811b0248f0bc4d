"""The mathematics of diffusion, on torch alone: each module one concept.

schedules   Schedule (tensors indexed by the paper's t), linear / cosine, step spacings
diffusion   q(x_t | x0), the posterior q(x_s | x_t, x0), eps <-> x0 <-> v, the SNR
denoiser    Denoiser(net, schedule, objective) -> Prediction(eps, x0); guidance; the output layout
samplers    plain functions over a Denoiser, one signature, a registry
losses      L_simple (min-SNR weighted) and L_hybrid as loss(denoiser, x0, y) -> [B]
likelihood  the variational bound L_T + sum L_{t-1} + L_0 in bits/dim
pixels      8-bit pixels <-> the model's [-1, 1]
precision   what "auto" precision means on this hardware; autocast
"""
