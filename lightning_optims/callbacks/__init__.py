from lightning_optims.callbacks.schedule_free import ScheduleFreeCallback, is_schedule_free

__all__ = ["ScheduleFreeCallback", "is_schedule_free"]
