"""`ddpmkit serve`: a local web page to watch and steer trained runs (optional extra `ddpmkit[serve]`).

settings   where the server listens (a warning when not on loopback) and what one request may ask
runs       the runs a server shows, each loaded once at start-up, and what the Run tab says of them
requests   the page's inputs checked and turned into sampling requests; the server's limits
generate   the reverse process streamed as pictures, the final grid and its downloads; comparisons
forward    the forward process q(x_t | x0) at one t, with alpha_bar_t and the SNR
app        the Gradio page (a thin layout over the modules above) and the server

Only `app` imports Gradio; the rest are plain functions, tested without a browser.
"""
