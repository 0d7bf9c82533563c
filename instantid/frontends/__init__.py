"""The front ends: the endpoint functions (api: page, gradio_client, MCP), the page's builders (ui), the command
line (cli, run as `python -m instantid`) and the Gradio adapter. They never import torch."""
