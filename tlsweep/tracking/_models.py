"""The exported model in MLflow: logged on the parent run, evaluated, registered.

:class:`TrackerModels` is the model side of :class:`tlsweep.tracking.Tracker` (which mixes it
in): the winner's Keras model logged as an MLflow model (:meth:`~TrackerModels.log_parent_model`),
MLflow's own classifier evaluation of its test predictions
(:meth:`~TrackerModels.log_evaluation`), and the model registry, where the ``champion`` alias
moves to a new version only when its validation score is better (:meth:`~TrackerModels.register`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from ._store import STUDY_TAG, mlflow_value

log = logging.getLogger(__name__)

CHAMPION = "champion"  # the registry alias of the best registered version
SCORE_TAG = "tlsweep.validation_score"  # registered versions: the score that ranks them
METRIC_TAG = "tlsweep.validation_metric"
DIRECTION_TAG = "tlsweep.direction"


class TrackerModels:
    """The model side of a :class:`~tlsweep.tracking.Tracker`: it uses the tracker's client,
    tracking URI, study and parent run."""

    client: Any  # mlflow.MlflowClient
    tracking_uri: str
    study: str
    parent_run_id: str | None
    parent_state_kept: Any  # Tracker.parent_state_kept: the parent's state kept around a block

    def log_parent_model(self, model: Any, meta: Mapping[str, Any], path: Any) -> str | None:
        """The exported Keras model as an MLflow model on the parent run, with its file.

        Returns the logged model's URI (``models:/m-...``), what :meth:`register` takes.
        """
        import mlflow

        if not self.parent_run_id:
            return None
        mlflow.set_tracking_uri(self.tracking_uri)
        with self.parent_state_kept(), mlflow.start_run(run_id=self.parent_run_id):
            info = mlflow.keras.log_model(
                model,
                name="model",
                pip_requirements=["keras", "tensorflow"],
                metadata={"class_names": meta["class_names"]},
            )
            mlflow.log_dict(dict(meta), "model_metadata.json")
            mlflow.log_artifact(str(path), "export")
        return str(info.model_uri)

    # --- MLflow's own evaluation of the winner ------------------------------------------------
    def log_evaluation(self, proba: Any, labels: Any, class_names: list[str]) -> dict[str, float]:
        """MLflow's default classifier evaluator on the winner's test predictions.

        The parent run gets MLflow's standard metrics (prefixed ``test_eval_``) and artifacts:
        confusion matrix, ROC, precision-recall, calibration (and lift for two classes) plots,
        the per-class table for more classes. The evaluator draws its curves from a model's
        ``predict_proba``; a static dataset gives it only the predicted labels (no curves). So it
        is handed a lookup "model": row ``i`` of the dataset answers with the winner's stored
        probabilities of test image ``i``, computed once by the exported head; nothing is
        re-predicted. SHAP explanations are off (they would explain the lookup, not the head).
        """
        import mlflow
        import numpy as np
        import pandas as pd
        from mlflow.models import Model
        from mlflow.pyfunc import PyFuncModel

        if not self.parent_run_id:
            return {}
        proba = np.asarray(proba, dtype=np.float64)
        proba = proba / proba.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7
        names = np.asarray(class_names, dtype=object)

        class _Predictions:  # what the evaluator reads from a scikit-learn classifier
            def predict(self, x: Any) -> Any:
                return names[proba[np.asarray(x["row"], np.int64)].argmax(axis=1)]

            def predict_proba(self, x: Any) -> Any:
                return proba[np.asarray(x["row"], np.int64)]

            def score(self, x: Any, y: Any, sample_weight: Any = None) -> float:
                return float(np.average(self.predict(x) == np.asarray(y), weights=sample_weight))

        lookup = PyFuncModel(
            model_meta=Model(flavors={"python_function": {"loader_module": "mlflow.sklearn"}}),
            model_impl=_Predictions(),
        )
        df = pd.DataFrame({"row": np.arange(len(proba)), "label": names[np.asarray(labels)]})
        mlflow.set_tracking_uri(self.tracking_uri)
        with (
            self.parent_state_kept(),
            mlflow.start_run(run_id=self.parent_run_id),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # schema hints about the integer row column
            result = mlflow.models.evaluate(
                lookup,
                data=df,
                targets="label",
                model_type="classifier",
                evaluators="default",
                evaluator_config={
                    "log_explainer": False,
                    "log_model_explainability": False,
                    "label_list": list(class_names),
                    "metric_prefix": "test_eval_",
                },
            )
        return dict(result.metrics)

    # --- the model registry --------------------------------------------------------------------
    def register(
        self,
        model_uri: str,
        name: str,
        score: float,
        metric: str,
        direction: str,
        tags: Mapping[str, Any] | None = None,
    ) -> tuple[int, bool, float | None]:
        """Register ``model_uri`` as a new version of ``name``; move the ``champion`` alias to it
        when its validation ``score`` beats the score of the version the alias holds.

        The score and its metric are stored as version tags, so later exports compare against
        them; the test score never takes part. A champion scored on another metric is left in
        place (the two numbers are not comparable). Returns (version, promoted, champion's
        score before).
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(self.tracking_uri)
        version_tags = {
            SCORE_TAG: repr(float(score)),
            METRIC_TAG: metric,
            DIRECTION_TAG: direction,
            STUDY_TAG: self.study,
            **{k: mlflow_value(v) for k, v in (tags or {}).items()},
        }
        mv = mlflow.register_model(model_uri, name, tags=version_tags)
        version = int(mv.version)
        before: float | None = None
        try:
            champ = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:  # no champion yet
            champ = None
        promote = champ is None
        if champ is not None:
            if champ.tags.get(METRIC_TAG) != metric or SCORE_TAG not in champ.tags:
                log.warning(
                    "%s@%s (version %s) was scored on %s, not %s: the alias stays where it is",
                    name,
                    CHAMPION,
                    champ.version,
                    champ.tags.get(METRIC_TAG, "no recorded metric"),
                    metric,
                )
            else:
                before = float(champ.tags[SCORE_TAG])
                better = score > before if direction == "maximize" else score < before
                promote = better
        if promote:
            self.client.set_registered_model_alias(name, CHAMPION, str(version))
        return version, promote, before
