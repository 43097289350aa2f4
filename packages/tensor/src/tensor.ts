// A Tensor is a shape, an element type and storage owned by one backend. FP8 tensors also carry the
// scales that dequantise them and the group layout those scales follow (docs/numerics.md).
import type { Backend } from "./backend.ts";
import { type DType, type Fp8Format, type HostArray, numel, type QuantGroup } from "./types.ts";

export interface QuantInfo {
  group: QuantGroup;
  format: Fp8Format;
  /** f32 scales in the group's layout; dequantised value = decode(code) * scale. */
  scales: Tensor;
  /** For 128x1 groups restarted at each expert's first row: E+1 row offsets (i32). */
  segments?: Tensor;
}

export class Tensor {
  disposed = false;

  constructor(
    readonly backend: Backend,
    readonly shape: readonly number[],
    readonly dtype: DType,
    /** Backend-specific storage: a typed array on host backends, a device buffer on cuda. */
    public storage: unknown,
    readonly quant: QuantInfo | null = null,
  ) {}

  get size(): number {
    return numel(this.shape);
  }

  /** Rows and columns of the tensor seen as a matrix: all leading dimensions are rows. */
  get rows(): number {
    return this.shape.length <= 1 ? 1 : this.size / this.cols;
  }

  get cols(): number {
    return this.shape.length === 0 ? 1 : this.shape[this.shape.length - 1];
  }

  /** Copies the data to the host. This is the only way to see values; it may wait for the device. */
  read(): Promise<HostArray> {
    return this.backend.read(this);
  }

  /** Reads a one-element tensor as a number. */
  async item(): Promise<number> {
    const a = await this.read();
    if (a.length !== 1) throw new Error(`item() on a tensor of shape [${this.shape}]`);
    return a[0];
  }

  /** Releases the storage now (and the scales of an FP8 tensor). Safe to call twice. */
  dispose(): void {
    this.backend.release(this);
  }

  toString(): string {
    return `Tensor(${this.dtype}[${this.shape.join(",")}]${this.quant ? ` ${this.quant.group}` : ""} on ${this.backend.name})`;
  }
}
