"""The gateway: the mesh's public door (docs/gateway.md). Its modules by the stage of a request:

    front ends    http_app.py        OpenAI HTTP (aiohttp): routes, errors, SSE streams
                  openai_parse.py    OpenAI bodies -> GenerationSpec (prompts, messages, fields)
                  openai_convert.py  OpenAI JSON <-> scalellm.types (typed JSON reads, sampling in;
                                     finish reason, usage, timings, logprobs out)
                  openai_format.py   results -> OpenAI chunks / responses, SSE framing
                  server.py          GatewayServer (listeners, health, drain) and the gRPC front end
    admission     core.py            GatewayCore: keys, the in-flight bound, metrics, generate()
                  admission.py       API keys, the served model and its limits, tokenization
    routing       routing.py         where the workers are, which one a choice goes to
    worker client session.py         one channel and Session stream per decode worker, one request
                                     on it (SessionCall)
    streaming     streaming.py       open each choice (retrying), detokenize, stop strings, merge n
    shared        request.py         GenerationSpec, GenerationRequest, ChoiceUpdate; GatewayError (to
                                     clients), WorkerFailure (from a decode worker)
                  config.py          GatewayConfig (flags, SCALELLM_GATEWAY_* environment)

A chat request: http_app -> openai_parse -> core -> admission -> streaming -> session (the decode
worker) -> streaming -> openai_format -> http_app.
"""
