"""Per-exit evaluation of exported checkpoints, and the `soft-ds eval` command.

    inputs.py    checkpoints given as NAME=DIR (config, exits, tokenizer) and training's held-out records
    metrics.py   held-out loss and perplexity per exit, greedy responses, KL to a reference by position
    judge.py     PandaLM pairwise judging: prompt, verdict parsing, order-averaged score, the exit grid
    triviaqa.py  TriviaQA closed-book: loading every released format, normalisation, EM/F1 per exit
    claims.py    the small-scale reproduction's table and the paper's claims, PASS or MISS
    report.py    JSON, markdown tables and PNG plots into one output folder
    command.py   `soft-ds eval {lm,kl,judge,triviaqa,claims}`
"""
