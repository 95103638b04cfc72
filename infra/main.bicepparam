// Parameters from environment variables, so that one file serves both paths:
//   azd:  `azd env set DATAVERSE_URL https://contoso.crm4.dynamics.com` (azd passes its environment's values;
//         it sets AZURE_ENV_NAME, AZURE_LOCATION and AZURE_PRINCIPAL_ID itself)
//   az:   `export DATAVERSE_URL=...` then
//         `az deployment group create --resource-group <rg> --parameters infra/main.bicepparam`
// The three DATAVERSE_* values are required: the deployment stops with the variable's name when one is unset.
// Every other parameter keeps main.bicep's default unless set here.
using './main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'dataverse-s2s')
param location = readEnvironmentVariable('AZURE_LOCATION', '')
param principalId = readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')
param principalType = readEnvironmentVariable('AZURE_PRINCIPAL_TYPE', 'User')

param dataverseUrl = readEnvironmentVariable('DATAVERSE_URL')
param dataverseTenantId = readEnvironmentVariable('DATAVERSE_TENANT_ID')
param dataverseClientId = readEnvironmentVariable('DATAVERSE_CLIENT_ID')

// How the app authenticates to Entra ID (docs/credentials.md). Read from the environment so that every
// `azd up` deploys the mode you chose: `azd env set DATAVERSE_CREDENTIAL federated` (or certificate) BEFORE
// the switch, else the next deployment sets the app back to 'secret'.
param dataverseCredential = readEnvironmentVariable('DATAVERSE_CREDENTIAL', 'secret')
param dataverseCertificateName = readEnvironmentVariable('DATAVERSE_CERTIFICATE_NAME', 'dataverse-certificate')
param dataverseAppUniqueName = readEnvironmentVariable('DATAVERSE_APP_UNIQUE_NAME', '')

// Product settings (README, "Settings"): a value you change stays changed across deployments.
param dataverseClientSecretName = readEnvironmentVariable('DATAVERSE_CLIENT_SECRET_NAME', 'dataverse-client-secret')
param webhookSecretName = readEnvironmentVariable('WEBHOOK_SECRET_NAME', 'webhook-signing-secret')
param messageSigningSecretName = readEnvironmentVariable('MESSAGE_SIGNING_SECRET_NAME', 'queue-message-signing-key')
param webhookKeyGraceSeconds = readEnvironmentVariable('WEBHOOK_KEY_GRACE_SECONDS', '600')
param webhookKeyRefreshSeconds = readEnvironmentVariable('WEBHOOK_KEY_REFRESH_SECONDS', '300')
param dataverseApiVersion = readEnvironmentVariable('DATAVERSE_API_VERSION', 'v9.2')
param syncQueueName = readEnvironmentVariable('SYNC_QUEUE_NAME', 'dynamics-sync')
param reconcileSchedule = readEnvironmentVariable('RECONCILE_SCHEDULE', '0 0 */6 * * *')
param dataverseTimeoutSeconds = readEnvironmentVariable('DATAVERSE_TIMEOUT_SECONDS', '30')
param dataverseMaxRetries = readEnvironmentVariable('DATAVERSE_MAX_RETRIES', '5')
param dataverseMaxRetrySeconds = readEnvironmentVariable('DATAVERSE_MAX_RETRY_SECONDS', '300')
param jobDeadlineSeconds = readEnvironmentVariable('JOB_DEADLINE_SECONDS', '480')
param httpMaxWaitSeconds = readEnvironmentVariable('HTTP_MAX_WAIT_SECONDS', '5')
param userCacheTtlSeconds = readEnvironmentVariable('USER_CACHE_TTL_SECONDS', '900')
param userCacheNegativeTtlSeconds = readEnvironmentVariable('USER_CACHE_NEGATIVE_TTL_SECONDS', '60')
param dataverseSharedThrottle = readEnvironmentVariable('DATAVERSE_SHARED_THROTTLE', 'auto')
param dataverseThrottleRefreshSeconds = readEnvironmentVariable('DATAVERSE_THROTTLE_REFRESH_SECONDS', '1')
param dataverseThrottleGrowAfter = readEnvironmentVariable('DATAVERSE_THROTTLE_GROW_AFTER', '10')
param dataverseThrottleHeartbeatSeconds = readEnvironmentVariable('DATAVERSE_THROTTLE_HEARTBEAT_SECONDS', '15')

// Optional; prefer `az keyvault secret set` after the deployment (see the README, "Deploy").
param dataverseClientSecret = readEnvironmentVariable('DATAVERSE_CLIENT_SECRET', '')
param webhookSigningSecret = readEnvironmentVariable('WEBHOOK_SIGNING_SECRET', '')
param messageSigningSecret = readEnvironmentVariable('MESSAGE_SIGNING_SECRET', '')

// Deny (default) or Allow; and a comma-separated list of addresses let through the vault firewall.
param keyVaultNetworkDefaultAction = readEnvironmentVariable('KEY_VAULT_NETWORK_DEFAULT_ACTION', 'Deny')
param keyVaultAllowedIpAddresses = split(readEnvironmentVariable('KEY_VAULT_ALLOWED_IPS', ''), ',')

// Comma-separated addresses let through the storage firewall (tools/queuectl.py, roster uploads); no /31 ranges
// (Storage refuses /31 and /32; a /32 is deployed as the bare address).
param storageAllowedIpAddresses = split(readEnvironmentVariable('STORAGE_ALLOWED_IPS', ''), ',')

// The authorization policy (docs/authorization.md): a blob path in the app's storage, or the default policy's tables.
param authorizationPolicy = readEnvironmentVariable('AUTHORIZATION_POLICY', '')
param authorizationPolicyBlob = readEnvironmentVariable('AUTHORIZATION_POLICY_BLOB', '')
param allowedEntitySets = readEnvironmentVariable('ALLOWED_ENTITY_SETS', 'contacts,accounts,leads')
