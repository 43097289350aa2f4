import { fileURLToPath } from "node:url";

/** The bundled corpus (datasets/default at the repository root): what `train` uses without --data. */
export const DEFAULT_DATASET_DIR: string = fileURLToPath(
  new URL("../../../datasets/default", import.meta.url),
);
