"""fedxray on Flower (the `flwr` package): a ServerApp and a ClientApp that are thin drivers over
fedxray's Client, strategies (fedxray.strategies) and metrics, for hospitals that each keep their
images on their own machine.

Importing this package does not import flwr (the helpers below work without it); the apps live in
fedxray.flower.server_app and fedxray.flower.client_app, which need `pip install -e ".[flower]"`.
The Flower App that `flwr run` submits is the folder APP_DIR. See README.md, "Beyond one machine: Flower".
"""
from .folders import write_client_folders, write_nih_folder
from .runconfig import (APP_DIR, CACHE_DIR, CLIENT_ID, DATA_DIR, FLOWER_KEYS, SERVER_KEYS, FaultPolicy,
                        config_from_run_config, run_config_from_config, write_run_config)

__all__ = ["APP_DIR", "CACHE_DIR", "CLIENT_ID", "DATA_DIR", "FLOWER_KEYS", "SERVER_KEYS", "FaultPolicy",
           "config_from_run_config", "run_config_from_config", "write_client_folders", "write_nih_folder",
           "write_run_config"]
