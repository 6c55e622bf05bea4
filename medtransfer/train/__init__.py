"""The training engine (:class:`~medtransfer.train.trainer.Trainer`, callbacks) and the fine-tuning
recipe for classification that runs on it (:func:`~medtransfer.train.finetune.finetune`)."""
