"""Evaluation math: Fréchet distance, improved precision/recall, Inception Score, and the feature
networks they run on (a hand-written Inception-v3 for real images, a small CNN for the tiny
built-in datasets). torch + numpy only; no scipy."""
from trainers.eval.feature_net import FeatureNet, extract_features, load_or_train_feature_net, train_feature_net
from trainers.eval.frechet import feature_stats, frechet_distance
from trainers.eval.inception import build_inception, load_inception
from trainers.eval.inception_score import inception_score
from trainers.eval.precision_recall import precision_recall

__all__ = ["frechet_distance", "feature_stats", "precision_recall", "inception_score", "load_inception",
           "build_inception", "FeatureNet", "train_feature_net", "load_or_train_feature_net", "extract_features"]
