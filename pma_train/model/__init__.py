from pma_train.model.build import build_model, padded_vocab_size, transformer_config

__all__ = ["build_model", "padded_vocab_size", "transformer_config"]
