"""Local predict API: TF Serving v1 and Open Inference Protocol v2 over a Unix socket."""
