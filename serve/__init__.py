"""`vptq serve`: an OpenAI-compatible HTTP server for a quantized (or original) model.

engine.py decodes the running requests as one batch on one thread; api.py is the FastAPI app
(completions, chat completions, models, health, metrics); metrics.py the Prometheus series;
run.py loads the model and runs uvicorn. Imports vptq (the model) and never cli/ (cli/serve.py
resolves a registry NAME[:VERSION] to a folder and calls run.serve).
"""
