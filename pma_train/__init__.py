from pma_train import startup

startup.install()
